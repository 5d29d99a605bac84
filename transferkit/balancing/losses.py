"""Loss-based methods: a `LossCombiner` turns the vector of task losses into one scalar, and one
ordinary backward pass follows. Every combiner is a thin adapter over a torchjd scalarizer.

Two rules the adapters add to torchjd:
- A task with no label in the whole global batch is *imputed* with its last seen loss,
  detached: no gradient flows to it, and stateful methods (DWA's epoch averages, FAMO's loss
  changes, GLS's product) see a steady value instead of a zero.
- State that must agree across processes (DWA's epoch averages, FAMO's loss changes) is computed
  from losses averaged over processes (`reduce`), so every rank takes the same weights.

Static weights (`tasks.NAME.weight`) multiply the filled losses before the scalarizer; only
`sum` and `mean` take them (the `Balancer` refuses them elsewhere), so `mean` is
`sum_k w_k L_k / K`: the weighted `sum` divided by the number of objectives K.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchjd import scalarization

from transferkit.balancing import state as foreign_state

Reduce = Callable[[Tensor], Tensor]  # mean over processes; identity on one process


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class LossCombiner(nn.Module):
    """`combiner(losses, present) -> scalar` over a `[K]` vector of task losses.

    Subclasses only choose the torchjd scalarizer; hooks that stateful methods need are
    `end_epoch()` (DWA) and `after_step(new_losses)` (FAMO, which needs the losses on the same
    batch after the update). `learnable` combiners (UW, IMTL-L) have parameters that the trainer
    gives to the optimizer. What each needs is declared in the registry (`methods.py`).

    `global_values`: state built from loss values (DWA's epoch averages, FAMO's loss changes)
    sees their mean over processes (`reduce`), so every rank takes the same weights.
    """

    def __init__(
        self, scalarizer: nn.Module, num_objectives: int, *, global_values: bool = False
    ) -> None:
        super().__init__()
        self.scalarizer = scalarizer
        self.global_values = global_values
        self.register_buffer("last_losses", torch.ones(num_objectives))
        # Static weights come from the recipe, not the checkpoint: not persistent, so a
        # checkpoint's state is the same with or without them.
        self.register_buffer("static_weights", torch.ones(num_objectives), persistent=False)
        self.reduce: Reduce = _identity

    @property
    def learnable(self) -> bool:
        return any(p.requires_grad for p in self.scalarizer.parameters()) and not isinstance(
            self.scalarizer, scalarization.FAMO
        )

    def impute(self, losses: Tensor, present: Tensor) -> Tensor:
        """Absent tasks take their last seen loss (detached); present ones are remembered."""
        filled = torch.where(present, losses, self.last_losses.to(losses))
        with torch.no_grad():
            self.last_losses.copy_(torch.where(present, losses.detach(), self.last_losses))
        return filled

    def forward(self, losses: Tensor, present: Tensor | None = None) -> Tensor:
        if present is None:
            present = torch.ones_like(losses, dtype=torch.bool)
        filled = self.impute(losses, present)
        if self.global_values:
            # local + (global - local).detach(): the global value with the local gradient.
            filled = filled + (self.reduce(filled.detach()) - filled.detach())
        return self.scalarizer(filled * self.static_weights.to(filled))

    def end_epoch(self) -> None:
        """Called once at the end of every epoch."""

    def after_step(self, new_losses: Tensor, present: Tensor) -> None:
        """Called after the optimizer step with the same batch's recomputed losses."""

    def state_dict_extra(self) -> dict:
        return foreign_state.capture(self.scalarizer)

    def load_state_dict_extra(self, state: dict) -> None:
        foreign_state.restore(self.scalarizer, state)


class DWACombiner(LossCombiner):
    """DWA sums batch losses into epoch averages and rolls its history at each epoch end."""

    def end_epoch(self) -> None:
        self.scalarizer.step()


class FAMOCombiner(LossCombiner):
    """FAMO updates its task logits from how much each loss fell across the model update, so it
    needs the batch's losses again after `optimizer.step()` (one extra forward, no backward)."""

    def after_step(self, new_losses: Tensor, present: Tensor) -> None:
        # Absent tasks get the value they were imputed with before the step: a zero change.
        filled = torch.where(present, new_losses.detach(), self.last_losses.to(new_losses))
        self.scalarizer.update(self.reduce(filled))

    def load_state_dict_extra(self, state: dict) -> None:
        famo = self.scalarizer

        def rebuild(_module: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.Adam([famo._w], lr=famo.lr, weight_decay=famo.weight_decay)

        foreign_state.restore(famo, state, rebuild)


def build_loss_combiner(
    method: str, num_objectives: int, options: dict, global_values: bool = False
) -> LossCombiner:
    """The combiner for a loss-based `multitask.method`."""
    k, flags = num_objectives, {"global_values": global_values}
    if method == "sum":
        return LossCombiner(scalarization.Sum(), k, **flags)
    if method == "mean":
        return LossCombiner(scalarization.Mean(), k, **flags)
    if method == "uw":
        return LossCombiner(scalarization.UW(k, **options), k, **flags)
    if method == "imtl_l":
        return LossCombiner(scalarization.IMTLL(k, **options), k, **flags)
    if method == "rlw":
        return LossCombiner(scalarization.Random(**options), k, **flags)
    if method == "gls":
        return LossCombiner(scalarization.GeometricMean(**options), k, **flags)
    if method == "dwa":
        return DWACombiner(scalarization.DWA(**options), k, **flags)
    if method == "famo":
        return FAMOCombiner(scalarization.FAMO(k, **options), k, **flags)
    raise KeyError(method)
