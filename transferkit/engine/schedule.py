"""Freeze schedules as phases: what trains, and each group's learning-rate multiplier, by epoch.

The state is derived from the epoch alone, so a resumed run lands in the right phase (unlike
callbacks that mutate the model when a milestone passes, Lightning #21901), and the optimizer
holds every parameter from the start, so unfreezing never rebuilds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from transferkit.errors import UserError, did_you_mean
from transferkit.models.backbone import Backbone
from transferkit.models.freezing import FreezeSpec

HEADS = "heads"  # the name that lr_mult uses for every task head (and auxiliary head)


class FreezeSchedule:
    """Phases `[(from_epoch, freeze spec, lr multipliers)]` applied to a backbone by epoch.

    Registered with Accelerate for checkpointing: its state is the current epoch.
    """

    def __init__(
        self, backbone: Backbone, phases: Sequence, layer_decay: float | None = None
    ) -> None:
        self.backbone = backbone
        self.layer_decay = layer_decay
        self.phases = []
        valid = [*backbone.group_names, HEADS]
        for index, phase in enumerate(phases):
            spec = FreezeSpec.parse(phase.freeze)
            try:
                spec.trainable_groups(backbone)  # resolves group names now, not at epoch k
            except UserError as err:
                raise UserError(f"schedule.phases.{index}.freeze: {err}") from None
            for group in phase.lr_mult:
                if group not in valid:
                    raise UserError(
                        f"schedule.phases.{index}.lr_mult: unknown group {group!r}."
                        f"{did_you_mean(group, valid)} Groups: {', '.join(valid)}"
                    )
            self.phases.append((int(phase.from_epoch), spec, dict(phase.lr_mult)))
        self.epoch = 0

    def phase_index(self, epoch: int) -> int:
        """Index of the phase in force at `epoch`."""
        return max(i for i, (start, _, _) in enumerate(self.phases) if start <= epoch)

    def apply(self, epoch: int) -> int:
        """Freeze the backbone as the phase at `epoch` says; returns the phase index."""
        self.epoch = epoch
        index = self.phase_index(epoch)
        self.backbone.freeze(self.phases[index][1])
        return index

    def lr_factor(self, group: str) -> float:
        """The multiplier of `group` in the current phase, times layer-wise decay."""
        multiplier = self.phases[self.phase_index(self.epoch)][2].get(group, 1.0)
        if self.layer_decay and group in self.backbone.group_names:
            depth_from_top = len(self.backbone.group_names) - self.backbone.group_names.index(group)
            multiplier *= self.layer_decay**depth_from_top
        return multiplier

    def state_dict(self) -> dict:
        """Checkpointed state: the epoch (everything else is derived from it)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore the epoch and re-apply the phase it falls in."""
        self.apply(int(state["epoch"]))
