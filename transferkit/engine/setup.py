"""From a recipe to everything a run needs: folder, Accelerator, model, data, loaders, optimizer,
schedule and strategy. No training happens here (the loop is `loop.py`, epochs `trainer.py`).

Distributed unfreezing: DDP registers only parameters that require grad when it wraps the
model (Lightning #20340). The model is prepared with every parameter trainable, before the
first phase freezes anything, and DDP runs with `find_unused_parameters=True`, so a group
unfrozen mid-run is already registered and its gradients are all-reduced; frozen parameters
are unused on every rank, keep `grad=None`, and the optimizer skips them.

FSDP (Accelerate's plugin, `ACCELERATE_USE_FSDP=true`, docs/distributed.md) shards the model
prepared the same way, and the phases freeze and unfreeze its parameters afterwards. That needs
per-parameter `requires_grad`: FSDP2, or FSDP1 with `use_orig_params=True` (without it each
wrapped unit is one flat parameter and no group could be frozen). `check_fsdp` refuses what
cannot work, and `init_optimizer_state` gives every parameter its optimizer state up front, so
that FSDP2 resumes a group that was frozen when the checkpoint was written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
    set_seed,
)
from torch.utils.data import DataLoader

from transferkit.balancing import Balancer
from transferkit.data import TaskImageDataset, build_transforms, num_workers
from transferkit.engine.batches import (
    auto_batch_size,
    default_batch_size,
    load_shared_data,
    make_loaders,
)
from transferkit.engine.ema import build_ema
from transferkit.engine.imbalance import balanced_sampler, loss_options
from transferkit.engine.metrics import metric_names
from transferkit.engine.mixing import build_mixer
from transferkit.engine.optim import build_lr_scheduler, build_optimizer
from transferkit.engine.regularizers import Regularizers, build_regularizers
from transferkit.engine.schedule import UNFROZEN_LR_MULT, FreezeSchedule
from transferkit.engine.strategies import build_strategy
from transferkit.errors import UserError, did_you_mean
from transferkit.models import (
    AdapterSpec,
    AuxHeadSpec,
    MultiTaskModel,
    attach_adapter,
    create_backbone,
)
from transferkit.recipes import Recipe, save_recipe
from transferkit.rundir import RunDir


@dataclass
class RunSetup:
    """Everything `train` uses; the model, optimizer, loaders and scheduler are prepared."""

    recipe: Recipe
    cfg: Any  # the recipe's train section (batch size and accumulation after auto_batch_size)
    run_dir: RunDir
    accelerator: Accelerator
    backbone: Any
    model: Any
    tasks: dict
    metric_names: dict
    monitor: str
    schedule: FreezeSchedule
    train_set: TaskImageDataset
    val_set: TaskImageDataset
    train_loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    strategy: Any
    balancer: Balancer | None
    workers: int
    regularizers: Regularizers | None = None
    loss_options: dict = dataclasses.field(default_factory=dict)  # per task (engine.losses)
    sampler: Any = None  # data.balanced_sampler's, else None (shuffled)
    ema: Any = None  # train.ema's timm ModelEmaV3, else None
    mixer: Any = None  # train.mixup's TaskMixer, else None
    steps_per_epoch: int = 1  # optimizer steps per epoch on each process


def prepare_run_dir(recipe: Recipe, output: str | None, resume: str | None) -> RunDir:
    """The run folder: the one to resume (it must have a checkpoint), or a new writable one."""
    if resume:
        run_dir = RunDir(resume)
        if not run_dir.checkpoints():
            raise UserError(
                f"--resume {run_dir.path}: no complete checkpoint in {run_dir.checkpoints_dir}"
            )
        return run_dir
    run_dir = RunDir(output if output else f"{recipe.output_dir}/{recipe.name}")
    try:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        probe = run_dir.path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write the run folder {run_dir.path}: {err.strerror}; choose another with --output"
        ) from None
    return run_dir


def make_accelerator(recipe: Recipe, run_dir: RunDir) -> Accelerator:
    cfg = recipe.train
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        # Accelerate silently trains in fp32 then: say so instead.
        raise UserError("train.mixed_precision: fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    # Accelerate keeps one global state per process; a second run in the same process (a
    # notebook, a sweep) with other settings (mixed precision) must start from a clean one.
    AcceleratorState._reset_state()
    return Accelerator(
        # Without a GPU, Accelerate only sets up multi-process (gloo) training under torchrun
        # when told it runs on the CPU; otherwise each process would train alone.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(run_dir.path), logging_dir=str(run_dir.tensorboard_dir)
        ),
        # The shuffling seed is the recipe's, not whatever the global RNG was when a loader was
        # prepared: loaders prepared later (over cached features) then shuffle exactly like the
        # image loader, on every process.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def set_up(recipe: Recipe, output: str | None = None, resume: str | None = None) -> RunSetup:
    """Build the run the recipe describes (see the module docstring)."""
    cfg = recipe.train
    run_dir = prepare_run_dir(recipe, output, resume)
    accelerator = make_accelerator(recipe, run_dir)
    set_seed(recipe.seed)
    main = accelerator.is_main_process
    if main:
        run_dir.clear_complete()
        written = run_dir.as_written(recipe) if resume else recipe  # the paths the user wrote
        save_recipe(written, run_dir.recipe_path)
        if not resume or run_dir.origin() is None:
            run_dir.write_origin()

    # ---- model and data
    backbone = create_backbone(recipe.model.backbone, recipe.model.weights, **recipe.model.kwargs)
    if backbone.load_report and main:
        print(f"backbone weights: {backbone.load_report}")
    if recipe.model.adapter is not None:
        attach_adapter(backbone, adapter_spec(recipe))
    data = load_shared_data(recipe, accelerator)
    metric_names = {name: section.metrics for name, section in recipe.tasks.items()}
    monitor = cfg.monitor or default_monitor(data.tasks, metric_names)
    check_monitor(monitor, data.tasks, metric_names)
    if data.skipped_images and main:
        run_dir.write_skipped_images(data.skipped_images)
        print(
            f"skipped {len(data.skipped_images)} unreadable images (listed in {run_dir.skipped_images_path})"
        )
    aux = [AuxHeadSpec(a.task, a.group, a.hidden, a.dropout) for a in recipe.model.aux_heads]
    size = recipe.data.image_size
    backbone.use_image_size(size)
    model = MultiTaskModel(backbone, data.tasks, aux)
    tasks = {t.name: t for t in data.tasks}
    weights = {name: section.weight for name, section in recipe.tasks.items()}
    norm_stats = recipe.schedule.norm_stats
    freeze_stats = norm_stats == "frozen" or (norm_stats == "auto" and bool(recipe.model.weights))
    unfrozen_lr_mult = fine_tune_lr_mult(recipe)
    schedule = FreezeSchedule(backbone, recipe.schedule.phases, recipe.schedule.layer_decay,
                              freeze_norm_stats=freeze_stats,
                              unfrozen_lr_mult=unfrozen_lr_mult,
                              phase_warmup_epochs=recipe.schedule.phase_warmup_epochs,
                              total_epochs=cfg.epochs,
                              from_weights=bool(recipe.model.weights),
                              lr_cycle=recipe.schedule.lr_cycle)  # fmt: skip

    train_set = TaskImageDataset(
        data.splits["train"],
        data.tasks,
        build_transforms(
            backbone.data_config, True, recipe.data.augment, size, hflip=recipe.data.horizontal_flip
        ),
        bad_images=recipe.data.bad_images,
        seed=recipe.seed,
    )
    eval_transform = build_transforms(backbone.data_config, False, "none", size)
    val_set = TaskImageDataset(
        data.splits["validation"], data.tasks, eval_transform, bad_images=recipe.data.bad_images
    )
    cfg = dataclasses.replace(cfg, batch_size=default_batch_size(
        cfg.batch_size, len(train_set), accelerator.num_processes, main))  # fmt: skip
    if main and (recipe.train.batch_size is None or recipe.schedule.unfrozen_lr_mult is None):
        # Recorded: a resume trains with the same batches (and the same steps per epoch, which
        # the schedule's position depends on) and rates even if the data or a default changes.
        chosen = dataclasses.replace(
            written,
            train=dataclasses.replace(written.train, batch_size=cfg.batch_size),
            schedule=dataclasses.replace(written.schedule, unfrozen_lr_mult=unfrozen_lr_mult),
        )
        save_recipe(chosen, run_dir.recipe_path)
    if cfg.auto_batch_size:
        cfg = auto_batch_size(model, cfg, backbone.data_config.input_size, accelerator)
    workers = num_workers(recipe.data.num_workers)
    sampler = balanced_sampler(recipe, train_set)
    train_loader, val_loader = make_loaders(
        train_set, val_set, cfg, workers, accelerator.num_processes, sampler
    )

    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    balancer = None
    if recipe.multitask.method != "sum":  # plain sum: the loss path has no balancer
        balancer = Balancer(recipe.multitask.method, model.output_keys, recipe.multitask.options,
                            recipe.seed, weights=weights)  # fmt: skip
        balancer.impl.to(accelerator.device)
    regularizers = build_regularizers(recipe.regularizers, model, accelerator.device)
    # L2-SP pulls towards the pretrained weights (and its beta term towards zero): weight
    # decay, which pulls everything towards zero, would fight it.
    l2_sp = recipe.regularizers.l2_sp is not None
    optimizer = build_optimizer(model, dataclasses.replace(cfg, weight_decay=0.0) if l2_sp else cfg)
    if balancer is not None and balancer.kind == "loss" and balancer.impl.learnable:
        # UW and IMTL-L learn their weights by gradient descent with the model.
        optimizer.add_param_group({"params": list(balancer.impl.parameters()), "weight_decay": 0.0,
                                   "lr": recipe.multitask.lr or cfg.lr, "group": "loss_weights"})  # fmt: skip
    # Accelerate steps a prepared scheduler once per process at each optimizer step (it assumes
    # a schedule written for one process that sees every batch): the schedule divides its step
    # count by the number of processes, so it runs at the same pace on any number of them.
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), accelerator)
    lr_scheduler = build_lr_scheduler(
        optimizer, cfg, schedule, steps_per_epoch, calls_per_step=accelerator.num_processes
    )
    check_fsdp(accelerator, balancer)
    ema = build_ema(cfg.ema, model, accelerator)  # before prepare: see engine/ema.py
    # Prepared while every parameter requires grad, so DDP registers all of them (see module doc).
    model, optimizer, train_loader, val_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, lr_scheduler
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        init_optimizer_state(optimizer.optimizer)
    accelerator.register_for_checkpointing(schedule)
    if balancer is not None:
        accelerator.register_for_checkpointing(balancer)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    strategy = build_strategy(accelerator, model, weights, balancer)
    strategy.loss_options = loss_options(recipe, tasks, train_set, accelerator.device)
    mixer = build_mixer(cfg.mixup, tasks, recipe.seed, accelerator)
    return RunSetup(recipe, cfg, run_dir, accelerator, backbone, model, tasks, metric_names,
                    monitor, schedule, train_set, val_set, train_loader, val_loader, optimizer,
                    lr_scheduler, strategy, balancer, workers, regularizers,
                    strategy.loss_options, sampler, ema, mixer, steps_per_epoch)  # fmt: skip


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


def adapter_spec(recipe: Recipe) -> AdapterSpec:
    """The recipe's `model.adapter` as the model layer's spec."""
    section = recipe.model.adapter
    targets = [section.targets] if isinstance(section.targets, str) else section.targets
    return AdapterSpec(section.method, tuple(targets), section.r, section.alpha, section.dropout,
                       section.train_rest)  # fmt: skip


def check_fsdp(accelerator: Accelerator, balancer: Balancer | None) -> None:
    """FSDP as asked for, with what transferkit can train under it, or one clear error."""
    if accelerator.distributed_type != DistributedType.FSDP:
        asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # as Accelerate
        if asked and accelerator.num_processes > 1:
            # Accelerate switches to FSDP only for GPU-like devices (accelerate/state.py); on a
            # CPU it silently keeps DDP, a full copy of the model in every process.
            raise UserError(
                f"ACCELERATE_USE_FSDP=true, but Accelerate {accelerate.__version__} shards models "
                f"only on GPUs: on {accelerator.device.type} it would train with DDP instead. Run on "
                "GPUs, or launch without FSDP (no --use_fsdp, no fsdp_config) to train with DDP."
            )
        return
    from torch.distributed.fsdp import StateDictType

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise UserError(
            "FSDP1 without use_orig_params flattens each wrapped unit into one parameter, so the "
            "freeze schedule cannot freeze or unfreeze groups: set fsdp_use_orig_params: true "
            "(FSDP_USE_ORIG_PARAMS=true), or fsdp_version: 2"
        )
    # Both put wrapper modules into parameter names ("blocks.0._fsdp_wrapped_module.norm1.weight",
    # "..._checkpoint_wrapped_module..."), which the freeze schedule's group lookup does not know.
    if plugin.activation_checkpointing:
        raise UserError(
            "fsdp_activation_checkpointing: true renames the backbone's parameters, so the freeze "
            "schedule cannot find its groups; set it to false"
        )
    if plugin.fsdp_version == 1 and plugin.auto_wrap_policy is not None:
        raise UserError(
            "FSDP1 with an auto wrap policy renames the backbone's parameters, so the freeze "
            "schedule cannot find its groups: use fsdp_version: 2 (any policy), or "
            "fsdp_auto_wrap_policy: NO_WRAP"
        )
    if plugin.fsdp_version == 1 and plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
        # A parameter that lies wholly in another process's shard (a ViT's cls_token) is left
        # out of this process's sharded optimizer state, and torch.distributed.checkpoint then
        # fails to resume: "Missing key in checkpoint state_dict: optimizer.param_groups".
        raise UserError(
            "FSDP1 checkpoints need fsdp_state_dict_type: FULL_STATE_DICT (sharded ones do not "
            "resume); or use fsdp_version: 2, which resumes from sharded checkpoints"
        )
    if balancer is not None and (
        balancer.kind == "gradient"
        or balancer.impl.learnable
        or getattr(balancer.impl, "needs_losses_after_step", False)
    ):
        # Per-task gradients of the sharded weights, loss weights outside the FSDP model and a
        # forward pass outside it (FAMO) would all need the full, unsharded parameters.
        raise UserError(
            f"multitask.method: {balancer.name} does not run under FSDP (it needs per-task "
            "gradients, learnable loss weights or an extra forward pass of the unsharded model); "
            "use sum, mean or a loss-based method without parameters (dwa, rlw, gls), or DDP"
        )


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state now, all zeros, as if no step had been taken.

    Under FSDP2, Accelerate resumes the optimizer through torch.distributed.checkpoint, which
    wants saved state for every parameter that requires grad; a group frozen until the
    checkpoint has none ("Missing optimizer state for parameter 'backbone.model.cls_token'").
    With state for all from the start, every checkpoint has it. Zero momentum (SGD, dampening
    0) and zero moments at step 0 (AdamW) update exactly as a lazily created state does.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # the step creates the state and moves no parameter
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for param in params:
        param.grad = None
        for value in optimizer.state[param].values():
            if torch.is_tensor(value):
                value.zero_()  # SGD's buffer took weight decay * param; AdamW counted a step


def optimizer_steps_per_epoch(batches: int, accelerator: Accelerator) -> int:
    """Optimizer steps per epoch on each process: `batches` (the unsharded loader's length) are
    shared out over the processes, and each takes a step every `grad_accum` of its batches."""
    per_process = math.ceil(batches / accelerator.num_processes)
    return max(math.ceil(per_process / accelerator.gradient_accumulation_steps), 1)


def default_monitor(tasks, chosen: dict) -> str:
    first = tasks[0]
    names = metric_names(first, chosen.get(first.name))
    preferred = "mae" if first.kind == "regression" else "accuracy"
    return f"val/{first.name}/{preferred if preferred in names else names[0]}"


def check_monitor(monitor: str, tasks, chosen: dict) -> None:
    """Fail before training, not after the first epoch, when train.monitor names no metric."""
    valid = [f"val/{t.name}/{m}" for t in tasks for m in metric_names(t, chosen.get(t.name))]
    if monitor not in valid:
        raise UserError(
            f"train.monitor: {monitor!r} is not a validation metric of this run.{did_you_mean(monitor, valid)} Metrics: {', '.join(valid)}"
        )
