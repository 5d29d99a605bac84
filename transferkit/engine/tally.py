"""What the steps between two reads leave on the device, brought back in one transfer.

On a GPU, reading a value on the host (`.item()`, `.tolist()`, `bool(tensor)`) waits for every
kernel queued before it: one read per step leaves the device idle while the host catches up.
So the step loop keeps the losses, the non-finite flags and the skipped-step count on the
device and reads them only at its check points (every `train.log_every` steps, at a step
checkpoint, before a stop and at the epoch's end): one `.tolist()` each, after one reduction
across processes so that every process takes the same decision from the same numbers.

Under `train.nonfinite: skip` with an optimizer that can skip on the device (torch's fused
AdamW and SGD read a `found_inf` flag, as they do for AMP's GradScaler), a window whose loss
is not finite leaves the parameters and the optimizer's state untouched without any read;
`close_window` gives that flag, agreed by every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor


@dataclass(frozen=True)
class Reading:
    """The host's view of the steps since the last read."""

    loss: float  # the last micro-batch's loss
    running: float  # the loss smoothed over the epoch's finite steps
    losses: dict[str, float]  # the last micro-batch's loss per output
    nonfinite: list[str]  # outputs whose loss was not finite on some process ("loss": the total)
    stopping: bool  # some process was asked to stop (Ctrl-C, SIGTERM)
    skipped: int  # steps the optimizer skipped on the device


class StepTally:
    """Per epoch: `add` each micro-batch's losses, `close_window` at each optimizer step where
    the optimizer skips on the device, `read` at a check point."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.running: Tensor | None = None
        self.steps_unread = 0  # optimizer steps since the last read
        self._clear()

    def _clear(self) -> None:
        self.last: tuple[Tensor, dict[str, Tensor]] | None = None
        self.nonfinite: dict[str, Tensor] = {}  # per output, and "loss"
        self.skipped: Tensor | None = None
        self.window: Tensor | None = None  # the open accumulation window's non-finite flag

    def add(self, loss: Tensor, losses: dict[str, Tensor]) -> None:
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        for key, value in {**losses, "loss": loss}.items():
            flag = ~torch.isfinite(value.detach())
            self.nonfinite[key] = self.nonfinite[key] | flag if key in self.nonfinite else flag
        self.window = ~finite if self.window is None else self.window | ~finite
        if self.running is None:
            self.running = loss
        else:  # a skipped (non-finite) loss leaves it, and a first one does not stick
            smoothed = torch.where(torch.isnan(self.running), loss,
                                   0.9 * self.running + 0.1 * loss)  # fmt: skip
            self.running = torch.where(finite, smoothed, self.running)
        self.last = (loss, {k: v.detach().float() for k, v in losses.items()})

    def close_window(self) -> Tensor:
        """1.0 where the window just ended had a non-finite loss on any process, else 0.0: the
        `found_inf` a fused optimizer skips its step on. Counted as a skipped step."""
        assert self.window is not None, "close_window before any add"
        found = self.window.float()
        if self.accelerator.num_processes > 1:  # a collective, not a read
            found = (self.accelerator.reduce(found, reduction="sum") > 0).float()
        self.skipped = found if self.skipped is None else self.skipped + found
        self.window = None
        return found

    def step_done(self) -> None:
        self.steps_unread += 1

    def read(self, stop_asked: bool) -> Reading | None:
        """The one read of a check point; None where no step ran since the last one (every
        process reaches the same check points, so every process skips or reads alike)."""
        if self.last is None or self.running is None:
            return None
        device = self.running.device
        keys = list(self.nonfinite)
        asked = torch.full((), float(stop_asked), device=device)  # a fill, not a copy
        shared = torch.stack([*(self.nonfinite[k].float() for k in keys), asked])
        if self.accelerator.num_processes > 1:
            shared = self.accelerator.reduce(shared, reduction="sum")
        loss, losses = self.last
        skipped = self.skipped if self.skipped is not None else torch.zeros((), device=device)
        local = torch.stack([self.running, loss, skipped, *losses.values()])
        values = torch.cat([shared, local]).tolist()  # the one read
        flags, (running, last, count, *per_output) = (
            values[: len(keys) + 1],
            values[len(keys) + 1 :],
        )
        self._clear()
        self.steps_unread = 0
        return Reading(loss=last, running=running, losses=dict(zip(losses, per_output)),
                       nonfinite=[k for k, f in zip(keys, flags) if f > 0],
                       stopping=flags[-1] > 0, skipped=round(count))  # fmt: skip


def as_floats(values: dict[str, Tensor | float]) -> dict[str, float]:
    """Values that may live on the device, as floats: the tensors in one read."""
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    read = torch.stack([v.float() for v in tensors.values()]).tolist() if tensors else []
    floats = dict(zip(tensors, read))
    return {k: floats[k] if k in floats else float(v) for k, v in values.items()}
