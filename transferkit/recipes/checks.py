"""The checks that relate several fields of a recipe (run only on one whose types are right),
and `normalized`: a checked recipe in the form later code expects, as a copy."""

from __future__ import annotations

from dataclasses import replace

from transferkit.core import CLASSIFICATION_METRICS, REGRESSION_METRICS
from transferkit.data import check_augment
from transferkit.errors import UserError, did_you_mean
from transferkit.models import BACKBONE_SOURCES, FreezeSpec, normalize_weights
from transferkit.recipes.schema import Recipe, TaskSection


def _check_task(name: str, task: TaskSection) -> list[str]:
    errors, where = [], f"recipe key tasks.{name}"
    if not name or "." in name or "@" in name:
        errors.append(
            f"recipe key tasks: bad task name {name!r} (it must be non-empty, no '.' or '@')"
        )
    if isinstance(task.column, list):
        if task.kind not in ("regression", "multilabel"):
            errors.append(f"{where}.column: a list of columns needs kind regression or multilabel")
        elif not task.column:
            errors.append(f"{where}.column: the list of columns is empty")
    if task.classes is not None:
        if task.kind == "regression":
            errors.append(f"{where}.classes: a regression task has no classes")
        elif task.kind == "binary" and len(task.classes) != 2:
            errors.append(
                f"{where}.classes: a binary task needs exactly 2 classes, got {len(task.classes)}"
            )
        elif len(set(task.classes)) != len(task.classes):
            errors.append(f"{where}.classes: class names must be unique")
        elif isinstance(task.column, list) and len(task.column) != len(task.classes):
            errors.append(
                f"{where}.classes: {len(task.classes)} classes but {len(task.column)} columns"
            )
    errors += _check_loss_options(where, task)
    allowed = REGRESSION_METRICS if task.kind == "regression" else CLASSIFICATION_METRICS
    for i, metric in enumerate(task.metrics or []):
        if metric not in allowed:
            errors.append(
                f"{where}.metrics.{i}: {metric!r} is not a {task.kind} metric "
                f"(use {', '.join(allowed)}).{did_you_mean(metric, allowed)}"
            )
    return errors


def _check_loss_options(where: str, task: TaskSection) -> list[str]:
    errors = []
    if task.kind == "regression":
        for key in ("label_smoothing", "class_weights"):
            if getattr(task, key):
                errors.append(f"{where}.{key}: a regression task has no classes; remove it")
    if task.focal_gamma is not None and task.kind not in ("binary", "multilabel"):
        errors.append(f"{where}.focal_gamma: focal loss is for binary and multilabel tasks")
    weights = task.class_weights
    if isinstance(weights, list):
        expected = 2 if task.kind == "binary" else len(task.classes or ()) or None
        if expected is not None and len(weights) != expected:
            errors.append(
                f"{where}.class_weights: {len(weights)} weights for {expected} classes; "
                "give one weight per class, in class order" + (
                    " ([negative, positive])" if task.kind == "binary" else "")
            )  # fmt: skip
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            errors.append(f"{where}.class_weights: weights must be >= 0, and one > 0")
    return errors


def _check_data_options(recipe: Recipe) -> list[str]:
    errors, data = [], recipe.data
    if "hflip" in data.tta and not data.horizontal_flip:
        errors.append(
            "recipe key data.tta: hflip, but data.horizontal_flip is false (these images must "
            "not be mirrored); remove hflip from data.tta"
        )
    task = recipe.tasks.get(data.balanced_sampler) if data.balanced_sampler else None
    if data.balanced_sampler and task is None:
        errors.append(
            f"recipe key data.balanced_sampler: unknown task {data.balanced_sampler!r} "
            f"(tasks: {', '.join(recipe.tasks)}).{did_you_mean(data.balanced_sampler, recipe.tasks)}"
        )
    elif task is not None and task.kind not in ("multiclass", "binary"):
        errors.append(
            f"recipe key data.balanced_sampler: task {data.balanced_sampler!r} is {task.kind}; "
            "balance by a multiclass or binary task"
        )
    errors += _check_stream_options(recipe)
    mixup = recipe.train.mixup
    if mixup is not None:
        if all(t.kind == "regression" for t in recipe.tasks.values()):
            errors.append(
                "recipe key train.mixup: every task is a regression task, and mixup/CutMix mix "
                "class labels; remove train.mixup (or add a classification task)"
            )
        if mixup.mixup_alpha == 0 and mixup.cutmix_alpha == 0:
            errors.append("recipe key train.mixup: mixup_alpha and cutmix_alpha are both 0")
    return errors


def _check_stream_options(recipe: Recipe) -> list[str]:
    data, steps = recipe.data, recipe.train.steps_per_epoch
    streamed = data.source == "webdataset" or data.streaming
    if streamed and steps is None:
        return [
            "recipe key train.steps_per_epoch: the training split streams, so it has no length "
            "to make an epoch of; set the optimizer steps an epoch takes on each process (one "
            "pass: the training images / (train.batch_size x processes x train.grad_accum))"
        ]
    if not streamed and steps is not None:
        return [
            "recipe key train.steps_per_epoch: only for a streamed training split (data.source: "
            "webdataset, or data.streaming: true); an epoch of this data is one pass; remove it"
        ]
    if data.streaming and data.source != "hub":
        return [
            f"recipe key data.streaming: it streams a Hugging Face dataset (data.source: hub: a "
            f"hub name or a folder of data files), not data.source: {data.source}"
        ]
    return []


def cross_checks(recipe: Recipe) -> list[str]:
    errors: list[str] = []
    source, _, name = recipe.model.backbone.partition(":")
    if source not in BACKBONE_SOURCES or not name.strip():
        errors.append(
            f"recipe key model.backbone: expected 'timm:NAME' or 'torchvision:NAME', "
            f"got {recipe.model.backbone!r}"
        )
    weights = recipe.model.weights
    if weights is not None and not weights.strip():
        errors.append("recipe key model.weights: use none, pretrained or a file path, got ''")
    if not recipe.tasks:
        errors.append("recipe key tasks: at least one task is required")
    for task_name, task in recipe.tasks.items():
        errors += _check_task(task_name, task)
    errors += check_augment(recipe.data)
    if recipe.data.unlabeled and recipe.distill is None:
        errors.append("recipe key data.unlabeled: images without labels teach only through a "
                      "teacher; set distill.teacher to a finished run, or remove it")  # fmt: skip
    for i, head in enumerate(recipe.model.aux_heads):
        if head.task not in recipe.tasks:
            errors.append(
                f"recipe key model.aux_heads.{i}.task: unknown task {head.task!r} "
                f"(tasks: {', '.join(recipe.tasks)}).{did_you_mean(head.task, recipe.tasks)}"
            )
    phases = recipe.schedule.phases
    if not phases:
        errors.append("recipe key schedule.phases: at least one phase is required")
    elif phases[0].from_epoch != 0:
        errors.append(
            f"recipe key schedule.phases.0.from_epoch: the first phase must start at 0, "
            f"got {phases[0].from_epoch}"
        )
    for i, phase in enumerate(phases):
        where = f"recipe key schedule.phases.{i}"
        if i and phase.from_epoch <= phases[i - 1].from_epoch:
            errors.append(
                f"{where}.from_epoch: must be greater than the previous phase's "
                f"({phases[i - 1].from_epoch}), got {phase.from_epoch}"
            )
        try:
            FreezeSpec.parse(phase.freeze)
        except (ValueError, OverflowError) as err:  # OverflowError: regex like a{99999999999}
            errors.append(f"{where}.freeze: {err}")
        for group, mult in phase.lr_mult.items():
            if mult < 0:
                errors.append(f"{where}.lr_mult.{group}: must be >= 0, got {mult}")
    errors += _check_data_options(recipe)
    errors += _check_multitask(recipe)
    errors += _check_transfer_methods(recipe)
    return errors


def _weights(weights: str | None) -> str | None:
    """`model.weights` with `none` and `random` (any case) as None."""
    return None if weights is None or not weights.strip() else normalize_weights(weights.strip())


def normalized(recipe: Recipe) -> Recipe:
    """A copy of a checked recipe in the form later code expects: `model.weights` None for
    random weights (`none`, `random`), and `model.adapter.targets` always a list."""
    model = recipe.model
    adapter = model.adapter
    if adapter is not None and isinstance(adapter.targets, str):
        adapter = replace(adapter, targets=[adapter.targets])
    weights = None if _weights(model.weights) is None else model.weights
    return replace(recipe, model=replace(model, weights=weights, adapter=adapter))


def _check_transfer_methods(recipe: Recipe) -> list[str]:
    errors = []
    adapter = recipe.model.adapter
    if adapter is not None:
        if not adapter.targets:
            errors.append(
                "recipe key model.adapter.targets: name at least one layer group or regex:PATTERN"
            )
        if adapter.method == "ia3" and adapter.dropout:
            errors.append("recipe key model.adapter.dropout: ia3 has no dropout; remove it")
    chosen = [k for k, v in vars(recipe.regularizers).items() if v is not None]
    if chosen and _weights(recipe.model.weights) is None:
        errors.append(
            f"recipe key regularizers.{chosen[0]}: it pulls the model towards its pretrained "
            "start, but model.weights is none (random weights); set model.weights to pretrained "
            "or a file, or remove the regularizer"
        )
    return errors


def _check_multitask(recipe: Recipe) -> list[str]:
    method = recipe.multitask.method
    if method == "sum" and not recipe.multitask.options and recipe.multitask.lr is None:
        return []  # the plain sum: nothing to check, and no torchjd to import (a second)
    from transferkit.balancing import METHODS, STATIC_WEIGHT_METHODS, build_method  # torchjd

    if method not in STATIC_WEIGHT_METHODS:
        weighted = [name for name, task in recipe.tasks.items() if task.weight != 1.0]
        if weighted:
            return [
                f"recipe key tasks.{weighted[0]}.weight: static weights apply with "
                f"multitask.method sum or mean; {method} sets its own, so remove the weight"
            ]
    if recipe.multitask.lr is not None and method not in ("uw", "imtl_l"):
        return ["recipe key multitask.lr: only uw and imtl_l learn weights with the optimizer"]
    try:
        if method in METHODS:  # options are checked by building the method once
            build_method(method, max(len(recipe.tasks), 1), recipe.multitask.options)
        else:
            build_method(method, 1)
    except UserError as err:
        return [f"recipe key {err}"]
    return []
