"""Task specs and the heads built from them.

Output shapes, by task kind: multiclass `[B, C]` logits; binary `[B]` logits; multilabel `[B, L]`
logits, `[B, 1]` for one label too (its targets are multi-hot rows); regression `[B]` for one
target, `[B, T]` for several.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from transferkit.core import TASK_KINDS, AuxHeadSpec, TaskSpec
from transferkit.errors import UserError

__all__ = ["TASK_KINDS", "AuxHead", "AuxHeadSpec", "Head", "TaskSpec"]


class Head(nn.Module):
    """Linear head, or a one-hidden-layer MLP with dropout, for one task."""

    def __init__(self, spec: TaskSpec, in_features: int) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        width = in_features
        if spec.hidden:
            layers += [nn.Linear(width, spec.hidden), nn.GELU()]
            width = spec.hidden
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        layers.append(nn.Linear(width, spec.num_outputs))
        self.net = nn.Sequential(*layers)
        # One output is squeezed where the targets are scalars (binary, one regression target);
        # multilabel targets are rows of L labels even when L is 1.
        self._squeeze = spec.num_outputs == 1 and spec.kind != "multilabel"
        self._standardized = spec.standardized
        if spec.standardized:  # rebuilt from the spec, so not in the weights file
            self.register_buffer("target_mean", torch.tensor(spec.target_mean), persistent=False)
            self.register_buffer("target_std", torch.tensor(spec.target_std), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[B, D]` features -> the task's output (see the module docstring for shapes); a
        standardized regression head answers in the target's own units."""
        out = self.net(features)
        if self._standardized:
            out = out * self.target_std.to(out.dtype) + self.target_mean.to(out.dtype)
        return out.squeeze(-1) if self._squeeze else out


def _pool_dims(shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """For a feature map shape, the dims to average over and the channel count.

    `[B, C]` -> nothing to pool; `[B, N, C]` tokens -> mean over N; `[B, C, H, W]` or
    `[B, H, W, C]` (Swin stages) -> mean over the spatial dims, which are the two equal ones
    for the square probe input used to build the head.
    """
    if len(shape) == 2:
        return (), shape[1]
    if len(shape) == 3:
        return (1,), shape[2]
    if len(shape) == 4:
        if shape[2] == shape[3] or shape[1] != shape[2]:
            return (2, 3), shape[1]
        return (1, 2), shape[3]
    raise UserError(f"cannot put an auxiliary head on a feature map of shape {tuple(shape)}")


class AuxHead(nn.Module):
    """Global-average-pools a group's feature map and applies a task head."""

    def __init__(
        self, spec: TaskSpec, feature_shape: Sequence[int], hidden: int | None, dropout: float
    ) -> None:
        super().__init__()
        self.dims, channels = _pool_dims(feature_shape)
        self.head = Head(dataclasses.replace(spec, hidden=hidden, dropout=dropout), channels)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Pool `feature_map` and apply the head."""
        pooled = feature_map.mean(dim=self.dims) if self.dims else feature_map
        return self.head(pooled)
