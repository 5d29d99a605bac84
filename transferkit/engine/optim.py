"""Optimizer and LR schedule with per-group learning rates written into the param groups.

One param group per (layer group, decay / no-decay). A `LambdaLR` sets every group's `lr` to
`base_lr * schedule(step) * multiplier(group, phase)` at each step, so discriminative learning
rates and layer-wise decay reach the optimizer itself and work with any scheduler (timm's
`lr_scale` is honoured only by timm's own schedulers: its issue #2691).
"""

from __future__ import annotations

import math

import torch

from transferkit.engine.schedule import HEADS, FreezeSchedule
from transferkit.models import MultiTaskModel


def param_groups(model: MultiTaskModel, weight_decay: float) -> list[dict]:
    """Every parameter of the model, grouped by layer group; biases and norms get no decay."""
    backbone = model.backbone
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in backbone.model.named_parameters():
        buckets.setdefault((backbone.group_of(name), param.ndim > 1), []).append(param)
    for module in (model.heads, model.aux_heads):
        for param in module.parameters():
            buckets.setdefault((HEADS, param.ndim > 1), []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "group": group}
        for (group, decay), params in buckets.items()
    ]


def build_optimizer(model: MultiTaskModel, train, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD over every parameter (frozen ones have no gradient and are skipped).
    `fused`: torch's fused kernels, which can skip a step on the device (`found_inf`)."""
    groups = param_groups(model, train.weight_decay)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, fused=fused or None)
    return torch.optim.AdamW(groups, lr=train.lr, fused=fused or None)


def schedule_factor(train, step: int, steps_per_epoch: int, span=(0, None)) -> float:
    """The LR schedule as a factor of the base LR at optimizer step `step`, over the epochs
    `span` = (first, end): the whole run by default, or one phase when each phase runs its own
    cycle. `train.warmup_epochs` warms up the run's start only; later phases have their own
    ramp (`FreezeSchedule.warmup_factor`)."""
    start, end = span
    end = train.epochs if end is None else end
    step -= start * steps_per_epoch
    warmup = train.warmup_epochs * steps_per_epoch if start == 0 else 0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    total = max((end - start) * steps_per_epoch, 1)
    if train.scheduler == "cosine":
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))
    if train.scheduler == "step":
        return train.gamma ** ((step // steps_per_epoch) // train.step_size)
    return 1.0


def build_lr_scheduler(
    optimizer, train, schedule: FreezeSchedule, steps_per_epoch: int, calls_per_step: int = 1
):
    """A LambdaLR whose per-group factor follows the LR schedule and the current phase.

    `steps_per_epoch` counts optimizer steps; `calls_per_step` is how many times the scheduler
    is stepped per optimizer step (Accelerate steps it once per process).
    """

    def factor(group: str, calls: int) -> float:
        # The rate set after `calls` is the one the next optimizer step uses: that step's own
        # epoch picks the phase's multiplier. (Reading the phase last applied lagged one step
        # behind a phase change: its first step ran with the previous phase's multipliers.)
        step = calls // calls_per_step
        epoch = step // max(steps_per_epoch, 1)
        return (
            schedule_factor(train, step, steps_per_epoch, schedule.lr_span(epoch))
            * schedule.warmup_factor(step, steps_per_epoch)
            * schedule.lr_factor(group, epoch)
        )

    def factor_for(group: str):
        return lambda calls: factor(group, calls)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor_for(g["group"]) for g in optimizer.param_groups]
    )
