"""`transferkit lr-find RECIPE [--phase N]`: a learning-rate range test for one phase.

The phase's freeze spec decides what trains; each group keeps its multiplier (`lr_mult`, layer
decay), so the suggestion is a value for `train.lr`, the base rate the multipliers scale. The
rate grows exponentially from `min_lr` to `max_lr` over `steps` optimizer steps (Smith 2017);
the test stops early once the smoothed loss exceeds 4x its minimum. The suggestion follows
fastai's "valley" rule: the middle of the longest stretch over which the loss keeps falling.
No run folder is made: nothing is left behind but the plot.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import DistributedType

from transferkit.engine import (
    build_run,
    cached_loaders,
    make_accelerator,
    model_outputs,
    multitask_loss,
)
from transferkit.errors import UserError
from transferkit.features import cache_decision
from transferkit.recipes import Recipe


@dataclass
class RangeTest:
    """Learning rates tried, the smoothed loss at each, and the suggested `train.lr`."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    phase: int


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's valley rule: find the longest decreasing subsequence of the losses, and take
    the rate half way down its steep part (start + len/3 + len/6), before the bottom where the
    loss is about to rise."""
    n = len(losses)
    if n < 3:
        raise UserError("lr-find: too few steps to suggest a learning rate; raise --steps")
    lengths = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
        if lengths[end] < lengths[i]:
            end = i
            start = end - lengths[end]
    sections = (end - start) / 3
    return lrs[start + int(sections) + int(sections / 2)]


def range_test(
    recipe: Recipe,
    phase: int = -1,
    steps: int = 100,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    beta: float = 0.98,
) -> RangeTest:
    """Run the range test on `phase` (an index into `schedule.phases`; -1: the last)."""
    phases = recipe.schedule.phases
    if not -len(phases) <= phase < len(phases):
        raise UserError(f"--phase {phase}: the recipe has phases 0 to {len(phases) - 1}")
    if not 0 < min_lr < max_lr:
        raise UserError(f"lr-find: need 0 < --min-lr < --max-lr, got {min_lr} and {max_lr}")
    phase = phase % len(phases)
    acc = make_accelerator(recipe)
    run = build_run(recipe, acc)
    optimizer = run.optimizer
    run.schedule.apply(phases[phase].from_epoch)
    factors = [run.schedule.lr_factor(g.get("group", "")) for g in optimizer.param_groups]
    # A phase that trains only heads runs on cached features, as training does: the shared
    # cache makes the test as fast as the heads once any run has stored them.
    use_cache, _ = cache_decision(run.cfg.feature_cache, run.backbone, recipe.data.augment,
                                  bool(recipe.model.aux_heads), phase)  # fmt: skip
    fsdp = acc.distributed_type == DistributedType.FSDP
    with tempfile.TemporaryDirectory(prefix="transferkit_lr_find_") as scratch:
        # Features kept out of the shared cache and too large for memory go to `scratch`.
        loader = (
            cached_loaders(run, Path(scratch))[0] if use_cache and not fsdp else run.train_loader
        )
        lrs, losses = _sweep(run, loader, factors, steps, min_lr, max_lr, beta)
    acc.end_training()
    return RangeTest(lrs, losses, valley(lrs, losses), phase)


def _sweep(run, loader, factors: list[float], steps: int, min_lr: float, max_lr: float,
           beta: float) -> tuple[list[float], list[float]]:  # fmt: skip
    """The rates tried and the smoothed, debiased loss after each step."""
    acc, optimizer = run.accelerator, run.optimizer
    run.model.train()
    lrs, losses, smoothed, best = [], [], 0.0, math.inf
    batches = itertools.cycle(loader)
    for step in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (step / max(steps - 1, 1))
        for group, factor in zip(optimizer.param_groups, factors):
            group["lr"] = lr * factor
        batch = next(batches)
        outputs = model_outputs(run.model, batch, run.cfg.channels_last)
        _, task_losses = multitask_loss(outputs, batch["targets"], batch["mask"], run.tasks,
                                        run.strategy.weights, run.strategy.loss_options)  # fmt: skip
        loss = run.strategy.loss(task_losses, batch, (0, step + 1))
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        optimizer.step()
        value = float(acc.reduce(loss.detach(), reduction="mean"))
        if not math.isfinite(value):
            break
        smoothed = beta * smoothed + (1 - beta) * value
        debiased = smoothed / (1 - beta ** (step + 1))
        lrs.append(lr)
        losses.append(debiased)
        best = min(best, debiased)
        if step > 5 and debiased > 4 * best:
            break  # diverged: the rest of the range says nothing
    return lrs, losses


def plot(result: RangeTest, path: Path, title: str) -> Path:
    """Loss against learning rate (log scale), with the suggestion marked."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    axis.plot(result.lrs, result.losses)
    axis.set_xscale("log")
    axis.axvline(result.suggestion, color="red", linestyle="--",
                 label=f"suggested train.lr {result.suggestion:.2e}")  # fmt: skip
    axis.set_xlabel("train.lr (each group's multiplier applies)")
    axis.set_ylabel("training loss (smoothed)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def lr_find(recipe: Recipe, phase: int = -1, steps: int = 100, output: str | None = None,
            min_lr: float = 1e-7, max_lr: float = 1.0) -> tuple[RangeTest, Path]:  # fmt: skip
    """The range test and its plot (`output`, default `lr_find_<recipe>_phase<N>.png`)."""
    result = range_test(recipe, phase, steps, min_lr, max_lr)
    path = Path(output or f"lr_find_{recipe.name}_phase{result.phase}.png")
    title = f"{recipe.name}, phase {result.phase} ({recipe.schedule.phases[result.phase].freeze})"
    return result, plot(result, path, title)
