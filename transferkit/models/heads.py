"""Task specs and the heads built from them.

Output shapes, by task kind: multiclass `[B, C]` logits; binary `[B]` logits; multilabel `[B, L]`
logits, `[B, 1]` for one label too (its targets are multi-hot rows); regression `[B]` for one
target, `[B, T]` for several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from transferkit.errors import UserError

TASK_KINDS: tuple[str, ...] = ("multiclass", "binary", "multilabel", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task: its kind, output size and head shape.

    `num_outputs` is the number of classes (multiclass), labels (multilabel) or targets
    (regression); binary tasks have one output. `hidden` adds an MLP layer of that width.
    """

    name: str
    kind: str
    num_outputs: int = 1
    hidden: int | None = None
    dropout: float = 0.0
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name or "." in self.name or "@" in self.name:
            raise UserError(f"task name {self.name!r} must be non-empty and contain no '.' or '@'")
        if self.kind not in TASK_KINDS:
            raise UserError(
                f"task {self.name!r}: kind must be one of {', '.join(TASK_KINDS)}, got {self.kind!r}"
            )
        if self.kind == "binary" and self.num_outputs != 1:
            raise UserError(
                f"task {self.name!r}: a binary task has one output, got num_outputs={self.num_outputs}"
            )
        if self.kind == "multiclass" and self.num_outputs < 2:
            raise UserError(f"task {self.name!r}: a multiclass task needs at least 2 classes")
        if self.num_outputs < 1:
            raise UserError(f"task {self.name!r}: num_outputs must be at least 1")
        named = self.class_names is not None and self.kind in ("multiclass", "multilabel")
        if named and len(self.class_names) != self.num_outputs:
            raise UserError(
                f"task {self.name!r}: {len(self.class_names)} class names for {self.num_outputs} outputs"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"task {self.name!r}: dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """A JSON-ready dict (inverse of `from_dict`)."""
        data = asdict(self)
        data["class_names"] = list(self.class_names) if self.class_names is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        """Build from `to_dict` output."""
        data = dict(data)
        if data.get("class_names") is not None:
            data["class_names"] = tuple(str(c) for c in data["class_names"])
        return cls(**data)


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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[B, D]` features -> the task's output (see the module docstring for shapes)."""
        out = self.net(features)
        return out.squeeze(-1) if self._squeeze else out


@dataclass(frozen=True)
class AuxHeadSpec:
    """An auxiliary head for `task` on the feature map of backbone group `group` (deep supervision).

    Its output is returned under the key `"{task}@{group}"`.
    """

    task: str
    group: str
    hidden: int | None = None
    dropout: float = 0.0

    @property
    def key(self) -> str:
        """The output key of this head."""
        return f"{self.task}@{self.group}"

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def pool_dims(shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
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
        self.dims, channels = pool_dims(feature_shape)
        head_spec = TaskSpec(
            spec.name, spec.kind, spec.num_outputs, hidden, dropout, spec.class_names
        )
        self.head = Head(head_spec, channels)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Pool `feature_map` and apply the head."""
        pooled = feature_map.mean(dim=self.dims) if self.dims else feature_map
        return self.head(pooled)
