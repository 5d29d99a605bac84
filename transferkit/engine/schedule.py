"""Freeze schedules as phases: what trains, and each group's learning-rate multiplier, by epoch.

The state is derived from the epoch alone, so a resumed run lands in the right phase (unlike
callbacks that mutate the model when a milestone passes, Lightning #21901), and the optimizer
holds every parameter from the start, so unfreezing never rebuilds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transferkit.errors import UserError, did_you_mean
from transferkit.models import Backbone, FreezeSpec

HEADS = "heads"  # the name that lr_mult uses for every task head (and auxiliary head)
# The fine-tune phase after a probe, when pretrained weights train in it: 0.25 of the rate kept
# the first fine-tune epoch within a few points of the probe and ended level with a hand-written
# loop within the noise at 5-50 labels per class; 0.2 ended 0.7 points behind it at 50, 0.3
# dipped 4 points at the unfreeze (docs/quality.md).
UNFROZEN_LR_MULT = 0.25


@dataclass(frozen=True)
class Phase:
    """From `from_epoch` on, what trains (`freeze`) and each group's rate multiplier."""

    from_epoch: int
    freeze: FreezeSpec
    lr_mult: dict[str, float]


class FreezeSchedule:
    """Phases applied to a backbone by epoch (a recipe's `schedule.phases`, checked against the
    backbone's groups). Registered with Accelerate for checkpointing: its state is the epoch.
    """

    def __init__(
        self,
        backbone: Backbone,
        phases: Sequence,  # recipe phases: from_epoch, freeze (a spec string), lr_mult
        *,
        layer_decay: float | None = None,
        freeze_norm_stats: bool = False,
        unfrozen_lr_mult: float = 1.0,
        phase_warmup_epochs: float = 0.0,
        total_epochs: int | None = None,
        from_weights: bool = False,
        lr_cycle: str = "run",
    ) -> None:
        self.backbone = backbone
        self.layer_decay = layer_decay
        # Fine-tuning pretrained weights on small batches: batch statistics of 16 images replace
        # running statistics estimated on millions, and accuracy falls at the unfreeze (measured
        # in docs/quality.md). Kept fixed unless a phase asks for `@norm=train`.
        self.freeze_norm_stats = freeze_norm_stats
        self.phases: list[Phase] = []
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
            self.phases.append(Phase(int(phase.from_epoch), spec, dict(phase.lr_mult)))
        # A phase that trains groups an earlier phase kept frozen (the fine-tune phase of
        # LP-FT: the heads have been fitted to the frozen features) runs every group, heads
        # included, at `unfrozen_lr_mult` of the rate unless its lr_mult names them: at the
        # full rate AdamW's first steps wreck the features the heads were fitted to, and the
        # first fine-tune epoch loses 15 points (docs/quality.md).
        self.defaults: list[dict[str, float]] = []
        frozen_before: set[str] = set()
        for phase in self.phases:
            trainable = set(phase.freeze.trainable_groups(backbone))
            fine_tune = trainable & frozen_before
            self.defaults.append(
                dict.fromkeys([*trainable, HEADS], unfrozen_lr_mult) if fine_tune else {}
            )
            frozen_before |= set(backbone.group_names) - trainable
        self.phase_warmup_epochs, self.total_epochs = phase_warmup_epochs, total_epochs
        # The first phase warms up too when it trains backbone groups of loaded weights (full
        # fine-tuning from the first step): a random head's gradients at the full rate wreck
        # the pretrained features before the head is any good (chance accuracy at 5 labels per
        # class without it, docs/quality.md). A probe, or random weights, needs no ramp here.
        first = set(self.phases[0].freeze.trainable_groups(backbone)) & set(backbone.group_names)
        self.warm_first_phase = from_weights and bool(first)
        # "phase": each phase runs the LR schedule anew over its own epochs (fastai's fine_tune:
        # a probe cycle, then a fine-tune cycle); "run": one schedule over the whole run.
        self.lr_cycle = lr_cycle
        self.epoch = 0

    def lr_span(self, epoch: int) -> tuple[int, int | None]:
        """The epochs the LR schedule spans at `epoch`: its phase's, or the whole run's."""
        return self.phase_span(epoch) if self.lr_cycle == "phase" else (0, None)

    def warmup_factor(self, step: int, steps_per_epoch: int) -> float:
        """A linear ramp over the first steps of every phase after the first (the groups that
        just joined, and the heads, start gently from the features the last phase left), and
        of the first when it fine-tunes loaded weights. It lasts `phase_warmup_epochs`, at most
        a third of the phase."""
        index = self.phase_index(step // max(steps_per_epoch, 1))
        if (index == 0 and not self.warm_first_phase) or not self.phase_warmup_epochs:
            return 1.0
        start, end = self.phase_span(self.phases[index].from_epoch)
        length = (end - start) if end is not None else self.phase_warmup_epochs * 3
        ramp = round(min(self.phase_warmup_epochs, length / 3) * steps_per_epoch)
        into = step - start * steps_per_epoch
        return (into + 1) / (ramp + 1) if into < ramp else 1.0

    def phase_span(self, epoch: int) -> tuple[int, int | None]:
        """The first epoch of the phase in force at `epoch`, and the first epoch after it (None
        for the last phase of a run of unknown length)."""
        index = self.phase_index(epoch)
        start = self.phases[index].from_epoch
        end = (
            self.phases[index + 1].from_epoch if index + 1 < len(self.phases) else self.total_epochs
        )
        if self.total_epochs is not None and self.total_epochs > start:
            end = min(end, self.total_epochs)  # the next phase never starts (a short run)
        return start, end

    def backbone_trained_by(self, epoch: int) -> bool:
        """Whether any phase up to the one at `epoch` changed the backbone: trained its groups,
        or the normalization layers of its frozen ones (`@norm=train` or `stats_frozen`)."""
        last = self.phase_index(epoch)
        return any(
            phase.freeze.trainable_groups(self.backbone) or phase.freeze.norm != "frozen"
            for phase in self.phases[: last + 1]
        )

    def phase_index(self, epoch: int) -> int:
        """Index of the phase in force at `epoch`."""
        return max(i for i, phase in enumerate(self.phases) if phase.from_epoch <= epoch)

    def apply(self, epoch: int) -> int:
        """Freeze the backbone as the phase at `epoch` says; returns the phase index."""
        self.epoch = epoch
        index = self.phase_index(epoch)
        spec = self.phases[index].freeze
        self.backbone.freeze(spec)
        if self.freeze_norm_stats and spec.norm != "train":
            self.backbone.freeze_norm_statistics()
        return index

    def lr_factor(self, group: str, epoch: int | None = None) -> float:
        """The multiplier of `group` in the phase of `epoch` (default: the current one), times
        layer-wise decay."""
        epoch = self.epoch if epoch is None else epoch
        index = self.phase_index(epoch)
        multiplier = self.phases[index].lr_mult.get(group, self.defaults[index].get(group, 1.0))
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
