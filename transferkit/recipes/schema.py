"""The fine-tune recipe: dataclasses, a type-hint driven validator, overrides and YAML I/O.

A recipe is validated in full before anything runs. Every problem becomes a `UserError` whose
message names the key path (`train.lr`, `schedule.phases.1.freeze`); several problems are joined
with '; '. Validation has two passes:

1. a generic walk over the dataclass fields and their type hints (types, unknown keys, required
   keys, numeric bounds declared with `_field(..., ge=0)`), and
2. `_cross_checks`, for rules that relate several fields (phase order, aux heads to tasks...).

`model.weights: none` (any case) is normalized to `None`, so later code only tests for `None`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import operator
import types
from collections.abc import Collection, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from transferkit.errors import UserError, did_you_mean
from transferkit.models.freezing import FreezeSpec

_UNIONS = (Union, types.UnionType)
_BOUNDS = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
}
CLASSIFICATION_METRICS = ("accuracy", "f1", "auroc")
REGRESSION_METRICS = ("mae", "rmse", "r2")
BACKBONE_SOURCES = ("timm", "torchvision")


def _field(default: Any = MISSING, *, factory: Any = MISSING, **bounds: float) -> Any:
    """A dataclass field whose numeric value (when not None) must satisfy `bounds` (ge/gt/le/lt)."""
    return field(default=default, default_factory=factory, metadata=bounds)


@dataclass(kw_only=True)
class AuxHeadSection:
    task: str
    group: str
    hidden: int | None = _field(None, ge=1)
    dropout: float = _field(0.0, ge=0, lt=1)


@dataclass(kw_only=True)
class ModelSection:
    backbone: str
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    aux_heads: list[AuxHeadSection] = field(default_factory=list)


@dataclass(kw_only=True)
class TaskSection:
    kind: Literal["multiclass", "binary", "multilabel", "regression"]
    column: str | list[str] | None = None
    classes: list[str] | None = None
    hidden: int | None = _field(None, ge=1)
    dropout: float = _field(0.0, ge=0, lt=1)
    weight: float = _field(1.0, ge=0)
    metrics: list[str] | None = None


@dataclass(kw_only=True)
class DataSection:
    source: Literal["imagefolder", "manifest", "disk", "hub"]
    path: str
    image_column: str = "image"
    train_split: str = "train"
    val_split: str | None = "validation"
    test_split: str | None = None
    val_fraction: float = _field(0.2, gt=0, lt=1)
    image_size: int | None = _field(None, ge=8)
    augment: Literal["none", "light", "strong"] = "light"
    bad_images: Literal["skip", "error"] = "skip"
    num_workers: int | None = _field(None, ge=0)
    trust_remote_code: bool = False
    max_samples: int | None = _field(None, ge=1)


@dataclass(kw_only=True)
class PhaseSection:
    from_epoch: int = _field(0, ge=0)
    freeze: str = "none"
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class ScheduleSection:
    phases: list[PhaseSection] = field(default_factory=lambda: [PhaseSection()])
    layer_decay: float | None = _field(None, gt=0, le=1)


@dataclass(kw_only=True)
class EarlyStoppingSection:
    patience: int = _field(3, ge=1)
    min_delta: float = _field(0.0, ge=0)


@dataclass(kw_only=True)
class TrainSection:
    epochs: int = _field(10, ge=1)
    max_steps: int | None = _field(None, ge=1)
    batch_size: int = _field(32, ge=1)
    eval_batch_size: int | None = _field(None, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = _field(1e-3, gt=0)
    weight_decay: float = _field(0.05, ge=0)
    momentum: float = _field(0.9, ge=0)
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = _field(0.0, ge=0)
    step_size: int = _field(10, ge=1)
    gamma: float = _field(0.1, gt=0)
    grad_accum: int = _field(1, ge=1)
    clip_grad: float | None = _field(None, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    early_stopping: EarlyStoppingSection | None = None
    monitor: str | None = None
    monitor_mode: Literal["max", "min"] = "max"
    keep_checkpoints: int = _field(2, ge=1)
    checkpoint_every: int | None = _field(None, ge=1)
    nonfinite: Literal["stop", "skip"] = "stop"
    feature_cache: Literal["auto", "force", "forbid"] = "auto"
    feature_cache_max_gb: float = _field(4.0, ge=0)
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    auto_batch_size: bool = False
    log_every: int = _field(10, ge=1)


@dataclass(kw_only=True)
class MultitaskSection:
    method: str = "sum"
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = _field(None, gt=0)


@dataclass(kw_only=True)
class Recipe:
    name: str = ""
    output_dir: str = "runs"
    seed: int = 0
    model: ModelSection
    tasks: dict[str, TaskSection]
    data: DataSection
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    multitask: MultitaskSection = field(default_factory=MultitaskSection)


# ---------------------------------------------------------------------------------------------
# Generic validation


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _key(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # ints past Python's digit limit cannot even be printed
        return f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    """How a type reads in 'expected ...' messages."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in _UNIONS:
        return " or ".join(_describe(arm) for arm in get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _suggest(word: str, candidates: Collection[str]) -> str:
    """`did_you_mean`, plus initials (`learning_rate` -> `lr`), which difflib does not see."""
    initials = "".join(part[:1] for part in word.lower().split("_"))
    if len(initials) > 1 and initials in candidates and not did_you_mean(word, candidates):
        return f" Did you mean: {initials}?"
    return did_you_mean(word, candidates)


def _convert(value: Any, tp: Any, path: list[Any], errors: list[str]) -> Any:
    """Check `value` against type `tp`: return the typed value, appending problems to `errors`."""
    origin, args = get_origin(tp), get_args(tp)

    def wrong(expected: str) -> None:
        errors.append(f"recipe key {_key(path)}: expected {expected}, got {_show(value)}")

    if tp is Any:
        return copy.deepcopy(value)  # the Recipe must not share mutable state with the input
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if origin in _UNIONS:
        if value is None and type(None) in args:
            return None
        arms = [arm for arm in args if arm is not type(None)]
        for arm in arms:
            trial: list[str] = []
            result = _convert(value, arm, path, trial)
            if not trial:
                return result
        for arm in arms:
            # A container that has the shape of an arm: report the problems inside it.
            if isinstance(value, list) and get_origin(arm) is list:
                return _convert(value, arm, path, errors)
            if isinstance(value, dict) and (
                get_origin(arm) is dict or dataclasses.is_dataclass(arm)
            ):
                return _convert(value, arm, path, errors)
        return wrong(_describe(tp))
    if origin is Literal:
        # YAML 1.1 reads a bare `no` as false (`mixed_precision: no`); take the user's meaning.
        if value is False and "no" in args:
            return "no"
        if isinstance(value, str) and value in args:
            return value
        errors.append(
            f"recipe key {_key(path)}: must be one of {', '.join(args)}, got {_show(value)}"
        )
        return None
    if origin is list:
        if not isinstance(value, list):
            return wrong("a list")
        return [_convert(item, args[0], [*path, i], errors) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            return wrong("a mapping")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append(f"recipe key {_key([*path, key])}: keys must be strings")
                continue
            out[key] = _convert(item, args[1], [*path, key], errors)
        return out
    if tp is bool:
        return value if isinstance(value, bool) else wrong("true or false")
    if tp is int:
        # bool is a subclass of int, but `epochs: true` is a mistake, not 1.
        is_int = isinstance(value, int) and not isinstance(value, bool)
        return value if is_int else wrong("an integer")
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string, so numeric strings are accepted here.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return wrong("a number")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return wrong("a number")
        return number if math.isfinite(number) else wrong("a finite number")
    if tp is str:
        return value if isinstance(value, str) else wrong("a string")
    raise TypeError(f"unsupported recipe type {tp!r} at {_key(path)}")  # a bug in the schema


def _build(cls: type, value: Any, path: list[Any], errors: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and declared bounds."""
    if not isinstance(value, dict):
        errors.append(
            f"recipe key {_key(path) or '(top level)'}: expected a mapping, got {_show(value)}"
        )
        return None
    before = len(errors)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, item in value.items():
        sub = [*path, key]
        if key not in fields:
            errors.append(f"unknown recipe key {_key(sub)}.{_suggest(str(key), fields)}")
            continue
        kwargs[key] = result = _convert(item, _hints(cls)[key], sub, errors)
        for bound, limit in fields[key].metadata.items():
            check, symbol = _BOUNDS[bound]
            if isinstance(result, (int, float)) and not check(result, limit):
                errors.append(
                    f"recipe key {_key(sub)}: must be {symbol} {limit}, got {_show(result)}"
                )
    for name, f in fields.items():
        if name not in value and f.default is MISSING and f.default_factory is MISSING:
            errors.append(f"missing required recipe key {_key([*path, name])}")
    return cls(**kwargs) if len(errors) == before else None


# ---------------------------------------------------------------------------------------------
# Cross-field checks (run only on a recipe whose types are already right)


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
    allowed = REGRESSION_METRICS if task.kind == "regression" else CLASSIFICATION_METRICS
    for i, metric in enumerate(task.metrics or []):
        if metric not in allowed:
            errors.append(
                f"{where}.metrics.{i}: {metric!r} is not a {task.kind} metric "
                f"(use {', '.join(allowed)}).{did_you_mean(metric, allowed)}"
            )
    return errors


def _cross_checks(recipe: Recipe) -> list[str]:
    errors: list[str] = []
    source, _, name = recipe.model.backbone.partition(":")
    if source not in BACKBONE_SOURCES or not name.strip():
        errors.append(
            f"recipe key model.backbone: expected 'timm:NAME' or 'torchvision:NAME', "
            f"got {recipe.model.backbone!r}"
        )
    if isinstance(recipe.model.weights, str) and recipe.model.weights.strip().lower() == "none":
        recipe.model.weights = None
    elif recipe.model.weights is not None and not recipe.model.weights.strip():
        errors.append("recipe key model.weights: use none, pretrained or a file path, got ''")
    if not recipe.tasks:
        errors.append("recipe key tasks: at least one task is required")
    for task_name, task in recipe.tasks.items():
        errors += _check_task(task_name, task)
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
    errors += _check_multitask(recipe)
    return errors


def _check_multitask(recipe: Recipe) -> list[str]:
    from transferkit.balancing import METHODS, build_method  # torchjd: only when checking

    method = recipe.multitask.method
    if method not in ("sum", "mean"):
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


# ---------------------------------------------------------------------------------------------
# Public API


def _container_arm(tp: Any) -> Any:
    """For `X | None` and the like, the arm an override can descend into (else `tp` itself)."""
    if get_origin(tp) in _UNIONS:
        for arm in get_args(tp):
            if dataclasses.is_dataclass(arm) or get_origin(arm) in (list, dict):
                return arm
    return tp


def _default_plain(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` as plain data (None when required)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if value is MISSING:
        return None
    if isinstance(value, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def apply_override(data: dict, override: str) -> dict:
    """Return a copy of `data` with one `key.path=value` override applied (value read as YAML).

    The key path is checked against the schema (unknown keys get a suggestion); list items are
    addressed by index, and the index one past the end appends. Values are validated later, with
    the rest of the recipe.
    """
    if not isinstance(override, str) or "=" not in override:
        raise UserError(
            f"bad override {_show(override)}: expected KEY.PATH=VALUE, e.g. train.lr=0.01"
        )
    key_text, _, value_text = override.partition("=")
    parts = key_text.strip().split(".")
    if not all(parts):
        raise UserError(
            f"bad override {override!r}: the key path {key_text.strip()!r} has an empty part"
        )
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        raise UserError(
            f"bad override {override!r}: cannot read {value_text!r} as a YAML value"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"recipe: expected a mapping at the top level, got {_show(data)}")
    result = copy.deepcopy(data)
    node: Any = result
    tp: Any = Recipe
    for i, part in enumerate(parts):
        path, tp = parts[: i + 1], _container_arm(tp)
        origin = get_origin(tp)
        if dataclasses.is_dataclass(tp):
            if part not in _hints(tp):
                hint = _suggest(part, _hints(tp))
                raise UserError(
                    f"unknown recipe key {_key(path)} (in override {override!r}).{hint}"
                )
            child_tp = _hints(tp)[part]
        elif origin is dict or tp is Any:
            child_tp = get_args(tp)[1] if origin is dict else Any
        else:  # a list: the descent below only enters containers
            child_tp = get_args(tp)[0]
        key: Any = part
        if isinstance(node, list):
            if not part.isdecimal() or int(part) > len(node):
                raise UserError(
                    f"bad override {override!r}: {part!r} is not an index into recipe key "
                    f"{_key(path[:-1])} (a list of length {len(node)})"
                )
            key = int(part)
            if key == len(node):
                node.append(None)
        if i == len(parts) - 1:
            node[key] = value
            break
        arm = _container_arm(child_tp)
        if not (arm is Any or dataclasses.is_dataclass(arm) or get_origin(arm) in (list, dict)):
            raise UserError(f"bad override {override!r}: recipe key {_key(path)} has no sub-keys")
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None and dataclasses.is_dataclass(tp) and key not in node:
            # Absent from the file: start from the default, so `schedule.phases.0.freeze=all`
            # edits the default phase instead of failing on an empty list.
            child = _default_plain(tp, key)
        want = list if get_origin(arm) is list else dict
        if child is None:  # null or no default: create the container the schema expects
            child = want()
        node[key] = child
        if not isinstance(child, (dict, list) if child_tp is Any else want):
            raise UserError(
                f"bad override {override!r}: recipe key {_key(path)} is {_show(child)}, "
                f"not {'a list' if want is list else 'a mapping'}"
            )
        node, tp = child, child_tp
    return result


def parse_recipe(data: dict, overrides: Sequence[str] = (), source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping (after applying `overrides`) and build a `Recipe`.

    Raises `UserError` listing every problem found, each with its key path; `source` (a file
    name) prefixes the message.
    """
    prefix = "" if source == "<recipe>" else f"{source}: "
    try:
        for override in overrides:
            data = apply_override(data, override)
    except UserError as err:
        raise UserError(f"{prefix}{err}") from None
    errors: list[str] = []
    recipe = _build(Recipe, data, [], errors)
    if recipe is not None:
        errors = _cross_checks(recipe)
    if errors:
        raise UserError(prefix + "; ".join(errors))
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a YAML recipe; an empty `name` becomes the file's stem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read recipe {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping, got {_show(data)}")
    recipe = parse_recipe(data, overrides, source=str(path))
    if not recipe.name:
        recipe.name = path.stem
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """A plain, YAML/JSON-ready dict of every setting (defaults included); parses back equal."""
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the fully resolved recipe as YAML (parent folders are created)."""
    path = Path(path)
    try:
        text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except yaml.YAMLError as err:  # model.kwargs set from Python may hold non-YAML objects
        raise UserError(f"cannot write recipe {path}: {err}") from None
    except OSError as err:
        raise UserError(f"cannot write recipe {path}: {err}") from None
