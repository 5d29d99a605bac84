"""Freeze specs: which backbone tensors train, and what normalization layers do when frozen.

A spec is written as a short string, the same in recipes, on the command line and in Python:

    none                   everything trains
    all                    the whole backbone is frozen (a linear probe)
    up_to:layer3           groups from the stem up to and including `layer3` are frozen
    up_to:2                the same with a group index (negative indices count from the end)
    train:layer3,layer4    only the listed groups train
    regex:^layer4\\.1\\.    only parameters whose names match the regex train (the escape hatch)

followed by an optional `@norm=POLICY` for normalization layers inside frozen groups:

    frozen        (default) affine parameters and running statistics stay fixed
    stats_frozen  affine parameters train, running statistics stay fixed
    train         affine parameters train and running statistics update

"Frozen" is enforced by keeping those normalization layers in eval mode across `.train()` calls,
so BatchNorm buffers are bit-identical after any number of training steps (the drift that
Lightning's `BaseFinetuning` allows, its issue #15062).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from torch import nn

from transferkit.errors import UserError


class Grouped(Protocol):
    """What a freeze spec needs of a model: its layer groups (a `Backbone` is one)."""

    @property
    def group_names(self) -> list[str]: ...

    @property
    def groups(self) -> list: ...  # LayerGroup, each with `name` and `tensors`

    def group(self, name_or_index: str | int): ...

    def group_of(self, tensor_name: str) -> str | None: ...


NormPolicy = Literal["frozen", "stats_frozen", "train"]
NORM_POLICIES: tuple[str, ...] = ("frozen", "stats_frozen", "train")
# Batch-norm running statistics of the layers that train (a schedule-wide choice).
NORM_STATS: tuple[str, ...] = ("auto", "frozen", "train")
FREEZE_MODES: tuple[str, ...] = ("none", "all", "up_to", "train", "regex")

SPEC_HELP = (
    "use none, all, up_to:GROUP_OR_INDEX, train:GROUP[,GROUP...] or regex:PATTERN, "
    "optionally followed by @norm=frozen|stats_frozen|train"
)


@dataclass(frozen=True)
class FreezeSpec:
    """A parsed freeze spec (see the module docstring for the syntax)."""

    mode: str = "none"
    target: tuple[str, ...] = ()
    norm: str = "frozen"

    @classmethod
    def parse(cls, text: str | FreezeSpec) -> FreezeSpec:
        """Parse `MODE[:TARGET][@norm=POLICY]`; bad input raises a `UserError`."""
        if isinstance(text, FreezeSpec):
            return text
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"freeze spec must be a non-empty string: {SPEC_HELP}")
        body, norm = text.strip(), "frozen"
        if "@" in body:
            body, _, option = body.partition("@")
            key, _, value = option.partition("=")
            if key.strip() != "norm" or value.strip() not in NORM_POLICIES:
                raise UserError(
                    f"bad freeze option {option!r} in {text!r}: "
                    f"use @norm= with one of {', '.join(NORM_POLICIES)}"
                )
            norm = value.strip()
        mode, _, target = body.partition(":")
        mode = mode.strip()
        if mode not in FREEZE_MODES:
            raise UserError(f"unknown freeze mode {mode!r} in {text!r}: {SPEC_HELP}")
        if mode in ("none", "all"):
            if target:
                raise UserError(f"freeze mode {mode!r} takes no target (got {text!r})")
            return cls(mode, (), norm)
        if not target.strip():
            raise UserError(
                f"freeze mode {mode!r} needs a target after ':' (got {text!r}): {SPEC_HELP}"
            )
        if mode == "regex":
            try:
                re.compile(target)
            except (re.error, OverflowError, RecursionError) as err:
                raise UserError(f"bad regex in freeze spec {text!r}: {err}") from None
            return cls(mode, (target,), norm)
        names = tuple(t.strip() for t in target.split(",") if t.strip())
        if mode == "up_to" and len(names) != 1:
            raise UserError(f"up_to takes one group name or index (got {text!r})")
        return cls(mode, names, norm)

    def __str__(self) -> str:
        text = self.mode if not self.target else f"{self.mode}:{','.join(self.target)}"
        return text if self.norm == "frozen" else f"{text}@norm={self.norm}"

    def trainable_groups(self, backbone: Grouped) -> list[str]:
        """Names of the groups that train under this spec (for `regex`: groups with any match)."""
        names = backbone.group_names
        if self.mode == "none":
            return names
        if self.mode == "all":
            return []
        if self.mode == "up_to":
            last_frozen = names.index(backbone.group(self.target[0]).name)
            return names[last_frozen + 1 :]
        if self.mode == "train":
            wanted = {backbone.group(t).name for t in self.target}
            return [n for n in names if n in wanted]
        pattern = re.compile(self.target[0])
        return [g.name for g in backbone.groups if any(pattern.search(t) for t in g.tensors)]

    def trainable_predicate(self, backbone: Grouped) -> Callable[[str], bool]:
        """A function from a tensor name (relative to the wrapped model) to 'does it train'."""
        if self.mode == "regex":
            pattern = re.compile(self.target[0])
            return lambda name: bool(pattern.search(name))
        trainable = set(self.trainable_groups(backbone))
        return lambda name: backbone.group_of(name) in trainable


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm, GroupNorm, LayerNorm and library variants (timm's RmsNorm, FrozenBatchNorm2d)."""
    if isinstance(module, _NORM_TYPES):
        return True
    name = type(module).__name__
    return "Norm" in name and "Block" not in name and not list(module.children())
