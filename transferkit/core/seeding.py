"""Randomness derived from positions, not from history, so a resumed run replays it exactly."""

from __future__ import annotations

_PRIME = 1_000_003
_MASK = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers such as (seed, epoch, index)."""
    value = 0x5EED
    for part in parts:
        value = (value * _PRIME + int(part) + 1) & _MASK
        value ^= value >> 29
    return value
