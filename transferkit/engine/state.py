"""Where a run stands: `TrainerState`, saved into every checkpoint as `trainer_state.json` and
read back on resume (the loop's position, the best epoch so far, early stopping's count).

Saved and loaded here only. Its JSON keys are those of the dict that checkpoints held before
this type existed, so runs saved then resume unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from transferkit.core import LOWER_IS_BETTER
from transferkit.errors import UserError
from transferkit.rundir import CHECKPOINT_STATE


@dataclass
class TrainerState:
    epoch: int = 0  # the epoch being trained, or the last one finished when `epoch_done`
    batches: int = 0  # batches of `epoch` trained so far (a mid-epoch resume skips them)
    epoch_done: bool = False
    step: int = 0  # optimizer steps so far
    best: float | None = None  # the best value of the monitored metric
    best_epoch: int | None = None
    best_checkpoint: str | None = None  # kept when older checkpoints are deleted
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    skipped_steps: int = 0  # steps skipped for a non-finite loss (train.nonfinite: skip)

    @property
    def next_epoch(self) -> int:
        """The first epoch a resumed run trains (the current one again when it was cut short)."""
        return self.epoch + 1 if self.epoch_done else self.epoch

    @property
    def batches_done(self) -> int:
        """Batches of `next_epoch` already trained: the loader skips them on resume."""
        return 0 if self.epoch_done else self.batches

    def update_best(
        self, value: float, epoch: int, metric: str, mode: str, min_delta: float
    ) -> bool:
        """Track the best value of the monitored metric; True when `epoch` is the new best."""
        if math.isnan(value):
            return False  # a run that never had a metric saves its last model at the end
        if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER:
            mode = "min"  # errors improve downwards whatever train.monitor_mode says
        better = self.best is None or (
            value > self.best + min_delta if mode == "max" else value < self.best - min_delta
        )
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    def save(self, checkpoint: Path) -> None:
        """Written last into a checkpoint folder: its presence marks the checkpoint complete."""
        (checkpoint / CHECKPOINT_STATE).write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, checkpoint: Path) -> TrainerState:
        path = checkpoint / CHECKPOINT_STATE
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise UserError(
                f"checkpoint {checkpoint}: unreadable {CHECKPOINT_STATE} ({err})"
            ) from None
