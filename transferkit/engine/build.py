"""From a recipe to everything a run trains with: the model, the data and its loaders, the
freeze schedule, the optimizer and LR schedule, and the strategy, prepared by Accelerate
(`accelerator.py` says how DDP and FSDP see the model).

Nothing is written here: the run folder is the trainer's (`trainer.py`), so `lr-find`, `rank`
and the benchmarks build runs with the same code and no folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from timm.utils.model_ema import ModelEmaV3
from torch.utils.data import DataLoader, Sampler

from transferkit.core import MEAN_SCORE, AuxHeadSpec, TaskSpec, score_metric
from transferkit.data import StreamedTaskDataset, TaskImageDataset, build_transforms, num_workers
from transferkit.engine.accelerator import (
    check_fsdp,
    init_optimizer_state,
    optimizer_steps_per_epoch,
)
from transferkit.engine.batches import (
    StreamLoader,
    auto_batch_size,
    default_batch_size,
    eval_loader,
    load_shared_data,
    make_loaders,
    streamed_training,
)
from transferkit.engine.distill import Distiller, build_distiller
from transferkit.engine.ema import build_ema
from transferkit.engine.imbalance import balanced_sampler, loss_options
from transferkit.engine.metrics import metric_names
from transferkit.engine.mixing import TaskMixer, build_mixer
from transferkit.engine.optim import build_lr_scheduler, build_optimizer
from transferkit.engine.regularizers import Regularizers, build_regularizers
from transferkit.engine.schedule import UNFROZEN_LR_MULT, FreezeSchedule
from transferkit.engine.strategies import Strategy, build_strategy
from transferkit.errors import UserError, did_you_mean
from transferkit.models import (
    AUTO_WEIGHTS,
    AdapterSpec,
    Backbone,
    MultiTaskModel,
    attach_adapter,
    create_backbone,
    resolve_auto_weights,
)
from transferkit.recipes import Recipe, TrainSection

if TYPE_CHECKING:  # imported where a balancer is built: torchjd is slow to import
    from transferkit.balancing import Balancer


@dataclass(kw_only=True)
class RunSetup:
    """A run ready to train: the model, optimizer, loaders and LR scheduler are prepared."""

    recipe: Recipe  # with the defaults chosen here filled in (`with_chosen_defaults`)
    cfg: TrainSection  # the train section as trained (batch and accumulation after auto size)
    accelerator: Accelerator
    backbone: Backbone
    model: torch.nn.Module  # the MultiTaskModel, as Accelerate prepared it
    tasks: dict[str, TaskSpec]
    metric_names: dict[str, list[str] | None]  # tasks.NAME.metrics (None: every metric)
    monitor: str  # the validation metric that picks the best epoch
    schedule: FreezeSchedule
    train_set: TaskImageDataset | StreamedTaskDataset
    val_set: TaskImageDataset
    train_loader: DataLoader | StreamLoader  # a StreamLoader for a streamed split
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    strategy: Strategy
    balancer: Balancer | None  # multitask.method's, None for the plain sum
    workers: int  # data-loader worker processes
    regularizers: Regularizers | None
    sampler: Sampler | None  # data.balanced_sampler's; None: shuffled
    ema: ModelEmaV3 | None  # train.ema's average of the weights
    mixer: TaskMixer | None  # train.mixup's
    distiller: Distiller | None  # distill's teacher
    steps_per_epoch: int  # optimizer steps per epoch on each process
    skipped_images: list[str]  # unreadable images left out (data.bad_images: skip)

    def with_chosen_defaults(self, written: Recipe) -> Recipe:
        """`written` with the values this run chose where the recipe left them unset (the batch
        size, the fine-tune rate): recorded in recipe.yaml, so a resume trains with the same
        batches (and steps per epoch, which the schedule's position depends on) and rates
        even if the data or a default changes."""
        return dataclasses.replace(
            written,
            model=dataclasses.replace(
                written.model, weights=_chosen(written.model.weights, self.recipe.model.weights)
            ),
            train=dataclasses.replace(written.train, batch_size=self.recipe.train.batch_size),
            schedule=dataclasses.replace(
                written.schedule, unfrozen_lr_mult=self.recipe.schedule.unfrozen_lr_mult
            ),
        )


def build_run(recipe: Recipe, accelerator: Accelerator) -> RunSetup:
    """Build the run the recipe describes; writes nothing (see the module docstring)."""
    main = accelerator.is_main_process
    weights, said = resolve_auto_weights(recipe.model.backbone, recipe.model.weights)
    if said and main:
        print(said)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, weights=weights))
    _check_regularizers(recipe)
    set_seed(recipe.seed)  # every random initialization below follows from the recipe's seed

    # ---- model and data
    backbone = create_backbone(recipe.model.backbone, recipe.model.weights, **recipe.model.kwargs)
    if backbone.load_report and main:
        print(f"backbone weights: {backbone.load_report}")
    if recipe.model.adapter is not None:
        attach_adapter(backbone, _adapter_spec(recipe))
    if recipe.train.grad_checkpointing:
        _check_grad_checkpointing(recipe, accelerator)
        how = backbone.set_grad_checkpointing()
        if main:
            print(f"gradient checkpointing: {how}")
    data = load_shared_data(recipe, accelerator)
    chosen_metrics = {name: section.metrics for name, section in recipe.tasks.items()}
    monitor = recipe.train.monitor or _default_monitor(data.tasks, chosen_metrics)
    _check_monitor(monitor, data.tasks, chosen_metrics)
    aux = [AuxHeadSpec(a.task, a.group, a.hidden, a.dropout) for a in recipe.model.aux_heads]
    size = recipe.data.image_size
    backbone.use_image_size(size)
    model = MultiTaskModel(backbone, data.tasks, aux)
    tasks = {t.name: t for t in data.tasks}
    weights = {name: section.weight for name, section in recipe.tasks.items()}
    norm_stats = recipe.schedule.norm_stats
    freeze_stats = norm_stats == "frozen" or (norm_stats == "auto" and bool(recipe.model.weights))
    recipe = dataclasses.replace(recipe, schedule=dataclasses.replace(
        recipe.schedule, unfrozen_lr_mult=fine_tune_lr_mult(recipe)))  # fmt: skip
    schedule = FreezeSchedule(backbone, recipe.schedule.phases,
                              layer_decay=recipe.schedule.layer_decay,
                              freeze_norm_stats=freeze_stats,
                              unfrozen_lr_mult=recipe.schedule.unfrozen_lr_mult,
                              phase_warmup_epochs=recipe.schedule.phase_warmup_epochs,
                              total_epochs=recipe.train.epochs,
                              from_weights=bool(recipe.model.weights),
                              lr_cycle=recipe.schedule.lr_cycle)  # fmt: skip
    train_transform = build_transforms(backbone.data_config, True, recipe.data.augment, size,
                                       hflip=recipe.data.horizontal_flip,
                                       random_erasing=recipe.data.random_erasing,
                                       scale=recipe.data.scale,
                                       library=recipe.data.augment_library)  # fmt: skip
    eval_transform = build_transforms(backbone.data_config, False, "none", size)
    val_set = TaskImageDataset(
        data.splits["validation"], data.tasks, eval_transform, bad_images=recipe.data.bad_images
    )
    streamed = data.stream is not None
    if streamed:  # no length to size the batch by: the default's largest
        batch = recipe.train.batch_size or 32
    else:
        train_set = TaskImageDataset(data.splits["train"], data.tasks, train_transform,
                                     bad_images=recipe.data.bad_images, seed=recipe.seed)  # fmt: skip
        batch = default_batch_size(recipe.train.batch_size, len(train_set),
                                   accelerator.num_processes, main)  # fmt: skip
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, batch_size=batch))
    cfg = recipe.train
    if cfg.auto_batch_size:
        cfg = auto_batch_size(model, cfg, backbone.data_config.input_size, accelerator)
    workers = num_workers(recipe.data.num_workers)
    sampler = None
    if streamed:
        train_loader = streamed_training(recipe, cfg, data, train_transform, accelerator, workers)
        train_set, val_loader = train_loader.dataset, eval_loader(val_set, cfg, workers)
    else:
        sampler = balanced_sampler(recipe, train_set)
        train_loader, val_loader = make_loaders(
            train_set, val_set, cfg, workers, accelerator.num_processes, sampler
        )

    # ---- how it learns
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    balancer = None
    if recipe.multitask.method != "sum":  # plain sum: the loss path has no balancer
        from transferkit.balancing import Balancer

        processes = accelerator.num_processes
        reduce = partial(accelerator.reduce, reduction="mean") if processes > 1 else None
        balancer = Balancer(recipe.multitask.method, model.output_keys, recipe.multitask.options,
                            recipe.seed, weights=weights, reduce=reduce)  # fmt: skip
        balancer.to(accelerator.device)
    regularizers = build_regularizers(recipe.regularizers, model, accelerator.device)
    # L2-SP pulls towards the pretrained weights (and its beta term towards zero): weight
    # decay, which pulls everything towards zero, would fight it.
    l2_sp = recipe.regularizers.l2_sp is not None
    # `nonfinite: skip` with static weights: torch's fused kernels skip a step on the device
    # (loop.py); FSDP's sharded parameters and fp16's scaler (which skips on its own) keep the
    # per-step read.
    fused = (cfg.nonfinite == "skip" and balancer is None and cfg.mixed_precision != "fp16"
             and accelerator.distributed_type != DistributedType.FSDP)  # fmt: skip
    optimizer = build_optimizer(
        model, dataclasses.replace(cfg, weight_decay=0.0) if l2_sp else cfg, fused=fused
    )
    if balancer is not None and balancer.learnable:
        # UW and IMTL-L learn their weights by gradient descent with the model.
        optimizer.add_param_group({"params": balancer.learnable_parameters(), "weight_decay": 0.0,
                                   "lr": recipe.multitask.lr or cfg.lr, "group": "loss_weights"})  # fmt: skip
    # Accelerate steps a prepared scheduler once per process at each optimizer step (it assumes
    # a schedule written for one process that sees every batch): the schedule divides its step
    # count by the number of processes, so it runs at the same pace on any number of them.
    steps_per_epoch = (cfg.steps_per_epoch if streamed
                       else optimizer_steps_per_epoch(len(train_loader), accelerator))  # fmt: skip
    lr_scheduler = build_lr_scheduler(
        optimizer, cfg, schedule, steps_per_epoch, calls_per_step=accelerator.num_processes
    )
    check_fsdp(accelerator, balancer)
    ema = build_ema(cfg.ema, model, accelerator)  # before prepare: see engine/ema.py
    # Prepared while every parameter requires grad, so DDP registers all of them (accelerator.py).
    # A stream's loader is not: its readers split the shards themselves (no batch is sent from
    # one process to the others, nor read by all of them).
    if streamed:
        model, optimizer, val_loader, lr_scheduler = accelerator.prepare(
            model, optimizer, val_loader, lr_scheduler
        )
    else:
        model, optimizer, train_loader, val_loader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_loader, val_loader, lr_scheduler
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        init_optimizer_state(optimizer.optimizer)
    # Checkpointed with the run, in this order (custom_checkpoint_0, _1, ...: older runs too).
    for stateful in (schedule, balancer, ema, train_loader if streamed else None):
        if stateful is not None:
            accelerator.register_for_checkpointing(stateful)
    options = loss_options(recipe, tasks, train_set, accelerator.device)
    strategy = build_strategy(accelerator, model, weights, balancer, tasks=tasks,
                              loss_options=options, channels_last=cfg.channels_last)  # fmt: skip
    mixer = build_mixer(cfg.mixup, tasks, recipe.seed, accelerator)
    distiller = build_distiller(recipe.distill, tasks, backbone.data_config, accelerator.device)
    if (
        distiller is not None
        and recipe.data.augment == "none"
        and cfg.mixup is None
        and not streamed
    ):
        distiller.precompute(data.splits["train"], cfg.eval_batch_size or cfg.batch_size or 64)
    return RunSetup(recipe=recipe, cfg=cfg, accelerator=accelerator, backbone=backbone,
                    model=model, tasks=tasks, metric_names=chosen_metrics, monitor=monitor,
                    schedule=schedule, train_set=train_set, val_set=val_set,
                    train_loader=train_loader, val_loader=val_loader, optimizer=optimizer,
                    lr_scheduler=lr_scheduler, strategy=strategy, balancer=balancer,
                    workers=workers, regularizers=regularizers, sampler=sampler, ema=ema,
                    mixer=mixer, distiller=distiller, steps_per_epoch=steps_per_epoch,
                    skipped_images=data.skipped_images)  # fmt: skip


def _chosen(written: str | None, resolved: str | None) -> str | None:
    """The value recipe.yaml records: what `auto` resolved to, else what the user wrote."""
    return resolved if written == AUTO_WEIGHTS else written


def _check_regularizers(recipe: Recipe) -> None:
    chosen = [k for k, v in vars(recipe.regularizers).items() if v is not None]
    if chosen and recipe.model.weights is None:
        raise UserError(
            f"regularizers.{chosen[0]}: it pulls the model towards its pretrained start, but "
            f"{recipe.model.backbone} starts from random weights here (no pretrained weights "
            "load offline); set model.weights to pretrained or a file, or remove the regularizer"
        )


def only_adapter_trains(recipe: Recipe) -> bool:
    """Whether the backbone trains through an adapter alone: its pretrained weights stay."""
    return recipe.model.adapter is not None and not recipe.model.adapter.train_rest


def fine_tune_lr_mult(recipe: Recipe) -> float:
    """`schedule.unfrozen_lr_mult`, or the rule when it is unset: a quarter of the rate when
    pretrained weights train after a probe; the full rate when only an adapter trains, whose
    weights start where the model is unchanged (LoRA and LoHa ended 1 to 6.5 points higher at
    it than at 0.25 in 11 of 12 runs, 0.5 lower in one, and none lost more than half a point in
    the first fine-tune epoch; docs/transfer_methods.md)."""
    if recipe.schedule.unfrozen_lr_mult is not None:
        return recipe.schedule.unfrozen_lr_mult
    return 1.0 if only_adapter_trains(recipe) else UNFROZEN_LR_MULT


def _adapter_spec(recipe: Recipe) -> AdapterSpec:
    """The recipe's `model.adapter` as the model layer's spec."""
    section = recipe.model.adapter
    return AdapterSpec(section.method, tuple(section.targets), section.r, section.alpha,
                       section.dropout, section.train_rest)  # fmt: skip


def _check_grad_checkpointing(recipe: Recipe, accelerator: Accelerator) -> None:
    if recipe.model.aux_heads:
        raise UserError(
            "train.grad_checkpointing with model.aux_heads: the auxiliary heads read group outputs "
            "through forward hooks, which recomputing the groups would fire again; turn one off"
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError(
            "train.grad_checkpointing under FSDP is not tested here yet (no GPUs to test it on); "
            "train with DDP, or leave it off (FSDP's own fsdp_activation_checkpointing renames "
            "the parameters the freeze schedule looks for)"
        )


def _default_monitor(tasks: list[TaskSpec], chosen: dict[str, list[str] | None]) -> str:
    first = tasks[0]
    names = metric_names(first, chosen.get(first.name))
    preferred = "mae" if first.kind == "regression" else "accuracy"
    return f"val/{first.name}/{preferred if preferred in names else names[0]}"


def _check_monitor(
    monitor: str, tasks: list[TaskSpec], chosen: dict[str, list[str] | None]
) -> None:
    """Fail before training, not after the first epoch, when train.monitor names no metric."""
    valid = [f"val/{t.name}/{m}" for t in tasks for m in metric_names(t, chosen.get(t.name))]
    if all(score_metric(t.kind) in metric_names(t, chosen.get(t.name)) for t in tasks):
        valid.append(f"val/{MEAN_SCORE}")  # every task's accuracy or R^2, averaged
    if monitor not in valid:
        raise UserError(
            f"train.monitor: {monitor!r} is not a validation metric of this run."
            f"{did_you_mean(monitor, valid)} Metrics: {', '.join(valid)}"
        )
