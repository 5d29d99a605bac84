"""Class imbalance and loss options: each task's `LossOptions` from the recipe, checked against
the classes found in the data, and a balanced sampler for one task."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from transferkit.core import derive_seed
from transferkit.engine.losses import LossOptions, balanced_class_weights
from transferkit.errors import UserError
from transferkit.models import TaskSpec

_STREAM = 0xBA1A  # keeps the sampler's draws apart from other seeded streams


def loss_options(recipe, tasks: dict[str, TaskSpec], train_set, device) -> dict[str, LossOptions]:
    """Per task, its label smoothing, class weights (given, or balanced from the training
    labels) and focal gamma; a class-weight list of the wrong length is one clear error."""
    options = {}
    for name, section in recipe.tasks.items():
        task, weights = tasks[name], section.class_weights
        if weights == "balanced":
            weights = balanced_class_weights(task, train_set.targets[name], train_set.masks[name])
        elif weights is not None:
            expected = 2 if task.kind == "binary" else task.num_outputs
            if len(weights) != expected:
                names = ", ".join(task.class_names or ())
                raise UserError(
                    f"tasks.{name}.class_weights: {len(weights)} weights, but task {name!r} has "
                    f"{expected} classes ({names}); give one weight per class, in that order"
                )
            weights = torch.tensor(weights, dtype=torch.float32)
        options[name] = LossOptions(
            label_smoothing=section.label_smoothing,
            class_weights=None if weights is None else weights.to(device),
            focal_gamma=section.focal_gamma,
        )
    return options


class BalancedSampler(Sampler[int]):
    """Draws `len(dataset)` rows with replacement, each class of `task` with the same total
    weight; rows without that task's label keep their share (weight 1, the labelled rows' mean).

    Seeded by (seed, epoch) alone (`set_epoch`, which Accelerate's loader calls), so every
    process draws the same order and a resumed run replays it.
    """

    def __init__(self, targets: torch.Tensor, mask: torch.Tensor, seed: int) -> None:
        self.seed, self.epoch = seed, 0
        labels = targets.long().reshape(len(targets))
        counts = torch.bincount(labels[mask])
        present = int((counts > 0).sum())
        weights = torch.ones(len(labels), dtype=torch.float64)
        if present:
            share = mask.sum().double() / (present * counts.double().clamp_min(1))
            weights[mask] = share[labels[mask]]
        self.weights = weights

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _STREAM))
        rows = torch.multinomial(self.weights, len(self.weights), True, generator=generator)
        return iter(rows.tolist())


def balanced_sampler(recipe, train_set) -> BalancedSampler | None:
    """The sampler `data.balanced_sampler` asks for, or None."""
    name = recipe.data.balanced_sampler
    if name is None:
        return None
    return BalancedSampler(train_set.targets[name], train_set.masks[name], recipe.seed)
