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
