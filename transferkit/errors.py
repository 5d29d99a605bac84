"""User-facing errors.

Anything the user can fix (a bad name, a bad file, a bad recipe value) raises `UserError`.
The CLI prints its message on one line and exits with code 2; library users catch it like any
`ValueError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """An error caused by the user's input, with a message that says how to fix it."""


def _close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to `n` candidates that look like `word` (for "did you mean" hints)."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
    if not matches:
        # Substring hits help for names like "resnet" -> "resnet18".
        matches = [c for c in candidates if word.lower() in c.lower()][:n]
    return matches


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A ' Did you mean: a, b?' suffix, or '' when nothing is close."""
    matches = _close_matches(word, candidates)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


class Interrupted(Exception):  # noqa: N818 - an event, not an error: the run stopped cleanly
    """Training stopped on Ctrl-C or SIGTERM at a step boundary, after saving a checkpoint: the
    run continues exactly with `transferkit train --resume RUN_DIR`. The CLI exits 128 + the
    signal's number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, epoch: int, run_dir: str = "RUN_DIR") -> None:
        super().__init__(signum, step, epoch)
        self.signum, self.step, self.epoch, self.run_dir = signum, step, epoch, run_dir
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        import signal

        name = "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name
        return (
            f"stopped by {name} at step {self.step} (epoch {self.epoch}); the run is saved: "
            f"continue it with `transferkit train --resume {self.run_dir}`"
        )
