"""The fine-tune recipe: one dataclass per section, and the checks that relate several fields.

A recipe is validated in full before anything runs (`transferkit.recipes.io.parse_recipe`). Every
problem becomes a `UserError` whose message names the key path; several problems are joined
with '; '. Two passes: the generic walk over types and bounds (`validation.py`), then
`checks.py`, for rules that relate several fields (phase order, aux heads to tasks...).

The data section and task sections are the data layer's own classes; each layer owns its choices
(data sources, augment presets, task kinds, metric names, backbone sources) and this module
imports them.

`checks.normalized` then returns a copy in the form later code expects (`model.weights: none`
as `None`, adapter targets as a list); the input is never edited.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transferkit.core import bounded
from transferkit.data import DataSection, TaskSection
from transferkit.models import (
    ADAPTER_METHODS,
    AUTO_WEIGHTS,
    NORM_STATS,
)

__all__ = ["DataSection", "TaskSection"]


@dataclass(kw_only=True)
class AuxHeadSection:
    task: str
    group: str
    hidden: int | None = bounded(None, ge=1)
    dropout: float = bounded(0.0, ge=0, lt=1)


@dataclass(kw_only=True)
class AdapterSection:
    """A peft adapter (docs/transfer_methods.md): `targets` are layer groups or regex:PATTERN."""

    method: Literal[ADAPTER_METHODS]  # type: ignore[valid-type]
    targets: list[str] | str
    r: int = bounded(8, ge=1)
    alpha: float = bounded(16.0, gt=0)
    dropout: float = bounded(0.0, ge=0, lt=1)
    train_rest: bool = False


@dataclass(kw_only=True)
class ModelSection:
    backbone: str
    # pretrained, none (random), a file, or unset (auto): pretrained where they load offline
    # (a package ships them, or a local cache holds them), else random; the run says which.
    weights: str | None = AUTO_WEIGHTS
    kwargs: dict[str, Any] = field(default_factory=dict)
    aux_heads: list[AuxHeadSection] = field(default_factory=list)
    adapter: AdapterSection | None = None


@dataclass(kw_only=True)
class L2SPSection:
    """alpha/2 ||w - w0||^2 on the pretrained backbone, beta/2 ||w||^2 on heads and adapters."""

    alpha: float = bounded(0.01, ge=0)
    beta: float = bounded(0.01, ge=0)


@dataclass(kw_only=True)
class BSSSection:
    """eta * the sum of the k smallest squared singular values of the batch's features."""

    eta: float = bounded(0.001, ge=0)
    k: int = bounded(1, ge=1)


@dataclass(kw_only=True)
class DeltaSection:
    """beta/2 * the squared distance between the feature maps of the model and of its start,
    per image, summed over `groups` (default: every layer group)."""

    beta: float = bounded(0.01, ge=0)
    groups: list[str] | None = None


@dataclass(kw_only=True)
class RegularizersSection:
    l2_sp: L2SPSection | None = None
    bss: BSSSection | None = None
    delta: DeltaSection | None = None


@dataclass(kw_only=True)
class PhaseSection:
    from_epoch: int = bounded(0, ge=0)
    freeze: str = "none"
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class ScheduleSection:
    phases: list[PhaseSection] = field(default_factory=lambda: [PhaseSection()])
    layer_decay: float | None = bounded(None, gt=0, le=1)
    # Batch-norm running statistics while groups train: "auto" keeps them fixed when the
    # backbone starts from weights (pretrained or a file) and updates them from random weights.
    norm_stats: Literal[NORM_STATS] = "auto"  # type: ignore[valid-type]
    # The learning-rate multiplier of a phase that trains groups an earlier phase kept frozen
    # (LP-FT's fine-tune phase): every group in it, heads included, unless the phase's lr_mult
    # names them. Unset, the engine's rule picks it (0.25 when pretrained weights train, 1 when
    # only an adapter does; engine/build.py fine_tune_lr_mult) and recipe.yaml records it.
    unfrozen_lr_mult: float | None = bounded(None, ge=0)
    # A linear warmup at the start of every phase after the first, and of the first when it
    # trains backbone groups of loaded weights, in epochs (at most a third of the phase):
    # AdamW's first steps at the full rate otherwise wreck the pretrained features before the
    # heads fit them (docs/quality.md). 0 turns it off.
    phase_warmup_epochs: float = bounded(3.0, ge=0)
    # "phase": every phase runs train.scheduler anew over its own epochs from train.lr (times
    # its multipliers), as fastai's fine_tune does, so a fine-tune phase after a probe starts
    # from its own peak rather than where one cosine over the run had got to; "run": one
    # schedule over the whole run. Runs of one phase are the same either way.
    lr_cycle: Literal["run", "phase"] = "phase"


# What a key meant in a run saved before the key existed: resuming such a run keeps the
# schedule it started with rather than taking up today's default.
BEFORE_KEY_EXISTED = {
    ("schedule", "norm_stats"): "train",
    ("schedule", "unfrozen_lr_mult"): 1.0,
    ("schedule", "phase_warmup_epochs"): 0.0,
    ("schedule", "lr_cycle"): "run",
    ("tasks.*", "standardize"): False,  # every task's
    ("data", "augment_library"): "torchvision",
}


@dataclass(kw_only=True)
class EarlyStoppingSection:
    patience: int = bounded(3, ge=1)
    min_delta: float = bounded(0.0, ge=0)


@dataclass(kw_only=True)
class EmaSection:
    """An exponential moving average of the weights (timm's ModelEmaV3), updated every step."""

    decay: float = bounded(0.999, gt=0, lt=1)
    # Warmup: decay = 1 - (1 + step)^-warmup_power, capped at `decay`, so early averages
    # are not dominated by the random initial heads.
    warmup: bool = True
    warmup_power: float = bounded(0.75, gt=0)
    # Save the EMA weights as the run's model (and pick the best epoch by its metrics).
    final_model: bool = False


@dataclass(kw_only=True)
class MixupSection:
    """Mixup and CutMix (timm's Mixup, batch mode) with mixed targets for every task."""

    mixup_alpha: float = bounded(0.8, ge=0)
    cutmix_alpha: float = bounded(1.0, ge=0)
    prob: float = bounded(1.0, ge=0, le=1)  # chance that a batch is mixed at all
    switch_prob: float = bounded(0.5, ge=0, le=1)  # chance of CutMix when both are on
    regression: Literal["mix", "exclude"] = "mix"  # mixed rows: mixed values, or masked


# Accelerate's names for the experiment trackers it speaks to (accelerate.utils.LoggerType).
Tracker = Literal[
    "tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"
]


@dataclass(kw_only=True)
class TrainSection:
    epochs: int = bounded(10, ge=1)
    max_steps: int | None = bounded(None, ge=1)
    # Optimizer steps an epoch takes from a streamed training split (which has no length; each
    # process takes this many); with a split of known length an epoch is one pass over it.
    steps_per_epoch: int | None = bounded(None, ge=1)
    # Per process. Default (null): 32, halved down to 8 while an epoch would have fewer than 16
    # batches, so a small train set still takes many steps per epoch (docs/quality.md).
    batch_size: int | None = bounded(None, ge=1)
    eval_batch_size: int | None = bounded(None, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(0.05, ge=0)
    momentum: float = bounded(0.9, ge=0)
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = bounded(0.0, ge=0)
    step_size: int = bounded(10, ge=1)
    gamma: float = bounded(0.1, gt=0)
    grad_accum: int = bounded(1, ge=1)
    clip_grad: float | None = bounded(None, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    early_stopping: EarlyStoppingSection | None = None
    # The metric that picks the kept model (and early stopping's): `val/TASK/METRIC`, or
    # `val/mean_score`, every task's accuracy or R^2 averaged (what `fit` plans for several
    # tasks). Default: the first task's accuracy (its MAE for a regression).
    monitor: str | None = None
    monitor_mode: Literal["max", "min"] = "max"
    keep_checkpoints: int = bounded(2, ge=1)
    checkpoint_every: int | None = bounded(None, ge=1)
    # A non-finite loss: "stop" at the next check point (every log_every steps, a step
    # checkpoint, the epoch's end), before any checkpoint past it; "skip" the step on the device
    # (fused AdamW/SGD: the step still counts and the schedule moves on). See engine/loop.py.
    nonfinite: Literal["stop", "skip"] = "stop"
    feature_cache: Literal["auto", "force", "forbid"] = "auto"
    feature_cache_max_gb: float = bounded(4.0, ge=0)
    # Cached features are kept in a cache shared by every run and command (docs/feature_cache.md)
    # at feature_cache_dir (default $TRANSFERKIT_CACHE, else ~/.cache/transferkit/features),
    # which stays under feature_cache_limit_gb; false keeps them inside the run folder.
    feature_cache_shared: bool = True
    feature_cache_dir: str | None = None
    feature_cache_limit_gb: float = bounded(20.0, gt=0)
    channels_last: bool = False
    # Recompute each layer group's activations in the backward pass instead of keeping them:
    # less memory for more compute (frozen groups on the input side cost nothing either way).
    grad_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    auto_batch_size: bool = False
    # Steps between the loop's reads of the device (the logged losses, the non-finite and stop
    # checks): the steps between them never wait for the device.
    log_every: int = bounded(10, ge=1)
    # Where the per-step and per-epoch values go, through Accelerate's trackers. TensorBoard
    # writes into the run folder; mlflow and wandb need an extra: pip install transferkit[mlflow].
    trackers: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    ema: EmaSection | None = None
    mixup: MixupSection | None = None


@dataclass(kw_only=True)
class MultitaskSection:
    method: str = "sum"
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = bounded(None, gt=0)


@dataclass(kw_only=True)
class DistillSection:
    """Knowledge distillation from a finished run (engine/distill.py): each task's loss is
    (1 - alpha) x the loss on its labels + alpha x the loss on the teacher's outputs (soft
    targets at `temperature` for classification, its value for regression)."""

    teacher: str  # a finished run folder with the same tasks (its best model)
    alpha: float = bounded(0.5, ge=0, le=1)
    temperature: float = bounded(2.0, gt=0)


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
    regularizers: RegularizersSection = field(default_factory=RegularizersSection)
    distill: DistillSection | None = None
