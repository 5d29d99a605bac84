"""Per-task losses with missing labels masked out; `dict[task, Tensor]` in and out.

A task's loss follows its recipe options (`LossOptions`): label smoothing, class weights and
focal loss. Targets may be soft (mixup/CutMix): multiclass targets are then class
probabilities `[B, C]` instead of indices, binary and multilabel targets fractions in [0, 1].

Class weights, by kind: multiclass, one weight per class (cross-entropy's `weight`, the mean
normalized by the weights of the rows); binary, `[negative, positive]` (the same weighted mean);
multilabel, one weight per label on its positive term (BCE's `pos_weight`, a plain mean).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from transferkit.core import TaskSpec, task_of


@dataclass(frozen=True)
class LossOptions:
    """How one task's loss is computed (recipe keys `tasks.NAME.label_smoothing`,
    `class_weights`, `focal_gamma`); the default is the plain loss of its kind."""

    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None
    focal_gamma: float | None = None


PLAIN = LossOptions()


def task_loss(
    task: TaskSpec,
    output: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    options: LossOptions = PLAIN,
) -> torch.Tensor:
    """Mean loss over the rows that have a label; zero (with a graph) when none has.

    Computed over the whole batch, then masked: no shape depends on the data, so nothing here
    waits for the device (boolean indexing and `bool(mask.any())` do, on a GPU). Unlabelled rows
    hold a placeholder target (0, see `data/dataset.py`) and weigh nothing.
    """
    # Unlabelled rows' outputs are zeroed first: a non-finite one would otherwise send NaN
    # back through the loss's gradient (0 times NaN), where indexing sent an exact zero.
    labelled = mask.reshape(mask.shape + (1,) * (output.dim() - 1))
    output = torch.where(labelled, output.float(), 0.0)
    weights = options.class_weights
    if weights is not None:
        weights = weights.to(output.device, torch.float32)
    if task.kind == "multiclass":
        if target.is_floating_point():  # soft targets (mixup): class probabilities
            if weights is not None:
                return _weighted_soft_cross_entropy(output, target.float(), weights, mask, options)
            rows = F.cross_entropy(output, target.float(), label_smoothing=options.label_smoothing,
                                   reduction="none")  # fmt: skip
            return _masked_mean(rows, mask)
        target = target.long()
        rows = F.cross_entropy(output, target, weight=weights,
                               label_smoothing=options.label_smoothing, reduction="none")  # fmt: skip
        # torch's mean with class weights divides by the rows' weights, not their count.
        return _masked_mean(rows, mask, None if weights is None else weights[target])
    if task.kind in ("binary", "multilabel"):
        return _sigmoid_loss(task, output, target.float(), mask, options, weights)
    if task.standardized:  # the error in standard units: (output - target) / sd
        scale = device_constant(task.target_std, output.device)
        output, target = output / scale, target.float() / scale
    return _masked_mean(F.mse_loss(output, target.float(), reduction="none"), mask)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, weights=None) -> torch.Tensor:
    """Sum over labelled rows / their number (or their `weights`' sum): each row's elements are
    averaged as torch's "mean" averages them, and nothing is divided by zero."""
    rows = mask.reshape(mask.shape + (1,) * (values.dim() - 1))
    total = torch.where(rows, values, 0.0).sum()
    if weights is None:
        count = mask.sum() * (values[0].numel() if values.dim() > 1 else 1)
        return total / count.clamp_min(1)
    return total / torch.where(rows, weights, 0.0).sum().clamp_min(1e-12)


@functools.lru_cache(maxsize=64)
def device_constant(
    values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A constant made once per device: a fresh `torch.tensor(..., device="cuda")` every step
    would be a blocking copy."""
    return torch.tensor(values, dtype=dtype, device=device)


def _weighted_soft_cross_entropy(output, target, weights, mask, options) -> torch.Tensor:
    """Class-weighted cross-entropy of probability targets, normalized like torch's for class
    indices: by the rows' weights (sum of w_c * y_c), not by the row count as torch does for
    probabilities. A one-hot row then weighs what its index does, so a mixed batch's loss keeps
    the scale of an unmixed one's."""
    smoothing = options.label_smoothing
    smoothed = target * (1 - smoothing) + smoothing / target.shape[-1]
    log_p = F.log_softmax(output, dim=-1)
    rows = -(smoothed * weights * log_p).sum(-1)
    return _masked_mean(rows, mask, (target * weights).sum(-1))


def _sigmoid_loss(task, output, target, mask, options: LossOptions, weights) -> torch.Tensor:
    """BCE or focal loss, with label smoothing towards 1/2 and class weights per element."""
    if options.label_smoothing:
        target = target * (1 - options.label_smoothing) + options.label_smoothing / 2
    if options.focal_gamma is not None:
        # alpha -1: no fixed positive/negative balance, class_weights do that when asked.
        losses = sigmoid_focal_loss(output, target, alpha=-1, gamma=options.focal_gamma)
    else:
        losses = F.binary_cross_entropy_with_logits(output, target, reduction="none")
    if weights is None:
        return _masked_mean(losses, mask)
    if task.kind == "binary":
        element = weights[0] * (1 - target) + weights[1] * target
        return _masked_mean(losses * element, mask, element)
    return _masked_mean(losses * (1 + (weights - 1) * target), mask)  # pos_weight, soft too


def multitask_loss(
    outputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    tasks: dict[str, TaskSpec],
    weights: dict[str, float],
    options: dict[str, LossOptions] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every output's loss (auxiliary heads use their task's target and weight)."""
    losses, options = {}, options or {}
    for key, output in outputs.items():
        task = task_of(key)
        losses[key] = task_loss(
            tasks[task], output, targets[task], masks[task], options.get(task, PLAIN)
        )
    return weighted_sum(losses, weights), losses


def weighted_sum(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Each output's loss times its task's static weight, summed (auxiliary heads: their task's)."""
    return sum(weights.get(task_of(k), 1.0) * v for k, v in losses.items())


def balanced_class_weights(
    task: TaskSpec, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """`class_weights: balanced` from the training labels: n / (classes * count) per class
    (scikit-learn's "balanced") for multiclass and binary; negatives / positives per label
    for multilabel. A class without a labelled row counts as one."""
    target = target[mask]
    if task.kind == "multilabel":
        positives = target.float().sum(0)
        return (len(target) - positives) / positives.clamp_min(1)
    classes = 2 if task.kind == "binary" else task.num_outputs
    counts = torch.bincount(target.long().reshape(-1), minlength=classes).float()
    return len(target) / (classes * counts.clamp_min(1))
