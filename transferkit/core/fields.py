"""Bounded dataclass fields: the typed sections of a recipe declare numeric limits here, and
the recipe validator checks them (`transferkit.recipes.validation`)."""

from __future__ import annotations

import operator
from dataclasses import MISSING, field
from typing import Any

BOUNDS = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
}


def bounded(default: Any = MISSING, *, factory: Any = MISSING, **bounds: float) -> Any:
    """A dataclass field whose numeric value (when not None) must satisfy `bounds` (ge/gt/le/lt)."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bound(s) {sorted(unknown)}; use {', '.join(BOUNDS)}")
    return field(default=default, default_factory=factory, metadata=bounds)
