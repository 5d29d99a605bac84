"""Per-task losses with missing labels masked out; `dict[task, Tensor]` in and out."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transferkit.models.heads import TaskSpec
from transferkit.models.multitask import MultiTaskModel


def task_loss(
    task: TaskSpec, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean loss over the rows that have a label; zero (with a graph) when none has."""
    if not bool(mask.any()):
        return output.sum() * 0.0
    output, target = output[mask].float(), target[mask]
    if task.kind == "multiclass":
        return F.cross_entropy(output, target.long())
    if task.kind in ("binary", "multilabel"):
        return F.binary_cross_entropy_with_logits(output, target.float())
    return F.mse_loss(output, target.float())


def multitask_loss(
    outputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    tasks: dict[str, TaskSpec],
    weights: dict[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every output's loss (auxiliary heads use their task's target and weight)."""
    losses = {}
    for key, output in outputs.items():
        task = MultiTaskModel.task_of(key)
        losses[key] = task_loss(tasks[task], output, targets[task], masks[task])
    return weighted_sum(losses, weights), losses


def weighted_sum(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Each output's loss times its task's static weight, summed (auxiliary heads: their task's)."""
    return sum(weights.get(MultiTaskModel.task_of(k), 1.0) * v for k, v in losses.items())
