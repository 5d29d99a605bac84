"""The one backbone contract that everything downstream relies on.

A `Backbone` wraps a timm or torchvision classification model with its classifier removed.
Whatever the source, it offers the same things:

- `forward(x)` -> pooled features `[B, num_features]`;
- `num_features` and `data_config` (the preprocessing that belongs to the weights);
- `groups`: named layer groups ordered from the stem to the last block, which drive freezing,
  layer-wise learning rates and auxiliary heads;
- `forward_with_maps(x, group_names)` -> pooled features plus the feature maps of chosen groups;
- `freeze(spec)` with a normalization-layer policy that survives `.train()`.

The adapters in `timm_adapter.py` and `torchvision_adapter.py` are the only code that knows
which library a model came from; they compute the groups and the data config and hand them here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from transferkit.core import DataConfig, sort_safetensors_metadata
from transferkit.errors import UserError
from transferkit.models.freezing import FreezeSpec, is_norm_layer


@dataclass(frozen=True)
class LayerGroup:
    """A named set of backbone tensors (parameters and buffers) that are frozen together.

    `tensors` are names relative to the wrapped model; `output_module` is the module whose
    output is this group's feature map (used for auxiliary heads).
    """

    name: str
    tensors: tuple[str, ...]
    output_module: str
    num_params: int = 0


@dataclass
class LoadReport:
    """What happened when a weights file was loaded into a backbone."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped_classifier: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def short(names: list[str]) -> str:
            head = ", ".join(names[:4])
            return head + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")

        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.dropped_classifier:
            parts.append(f"dropped the source classifier ({short(self.dropped_classifier)})")
        parts.append(
            f"missing {len(self.missing)}" + (f" ({short(self.missing)})" if self.missing else "")
        )
        parts.append(
            f"unexpected {len(self.unexpected)}"
            + (f" ({short(self.unexpected)})" if self.unexpected else "")
        )
        return "; ".join(parts)


class Backbone(nn.Module):
    """A headless classification model behind one contract (see the module docstring).

    Build one with `transferkit.create_backbone("timm:resnet18")`, not directly.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        num_features: int,
        data_config: DataConfig,
        groups: Sequence[LayerGroup],
        load_report: LoadReport | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.num_features = int(num_features)
        self.data_config = data_config
        self.load_report = load_report
        self.set_groups(groups)
        # A peft adapter in the model (`adapters.attach_adapter`): freezing then trains its
        # weights and keeps the layers it adapts frozen.
        self.adapter = None
        self.freeze_spec = FreezeSpec.parse("none")
        # Normalization modules kept in eval mode whatever `.train()` says (frozen statistics).
        self._eval_norm_names: list[str] = []

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features `[B, num_features]`."""
        return self.model(x)

    def forward_with_maps(
        self, x: torch.Tensor, group_names: Iterable[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pooled features plus the output feature map of each named group."""
        maps: dict[str, torch.Tensor] = {}
        handles = []
        modules = dict(self.model.named_modules())
        for name in group_names:
            group = self.group(name)

            def hook(_module, _inputs, output, key=name):
                maps[key] = output[0] if isinstance(output, (tuple, list)) else output

            handles.append(modules[group.output_module].register_forward_hook(hook))
        try:
            pooled = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return pooled, maps

    # ----------------------------------------------------------------------------- groups
    @property
    def group_names(self) -> list[str]:
        """Group names from the input side to the output side."""
        return [g.name for g in self.groups]

    def group(self, name: str | int) -> LayerGroup:
        """The group with this name or index; a clear error names the valid ones."""
        if isinstance(name, int) or (isinstance(name, str) and name.lstrip("-").isdigit()):
            index = int(name)
            if not -len(self.groups) <= index < len(self.groups):
                raise UserError(
                    f"group index {index} is out of range: {self.name} has {len(self.groups)} "
                    f"groups (0..{len(self.groups) - 1})"
                )
            return self.groups[index]
        for g in self.groups:
            if g.name == name:
                return g
        from transferkit.errors import did_you_mean

        raise UserError(
            f"unknown layer group {name!r} for {self.name}.{did_you_mean(name, self.group_names)} "
            f"Groups: {', '.join(self.group_names)}"
        )

    def set_groups(self, groups: Sequence[LayerGroup]) -> None:
        """Set the layer groups (again, once an adapter renamed the tensors), counting parameters."""
        params = dict(self.model.named_parameters())
        self.groups: list[LayerGroup] = [
            LayerGroup(g.name, g.tensors, g.output_module,
                       sum(params[t].numel() for t in g.tensors if t in params))
            for g in groups
        ]  # fmt: skip
        self._group_of = {t: g.name for g in self.groups for t in g.tensors}

    def group_of(self, tensor_name: str) -> str:
        """The group that owns a parameter or buffer (name relative to the wrapped model)."""
        return self._group_of[tensor_name]

    # ----------------------------------------------------------------------------- freezing
    def freeze(self, spec: FreezeSpec | str) -> FreezeSpec:
        """Set `requires_grad` and the normalization policy from a freeze spec.

        Can be called again at any time (a new training phase): it derives everything from the
        spec and never depends on the previous state.
        """
        spec = FreezeSpec.parse(spec) if isinstance(spec, str) else spec
        is_trainable = spec.trainable_predicate(self)
        if self.adapter is not None:
            is_trainable = self.adapter.restrict(is_trainable)
        for name, param in self.model.named_parameters():
            param.requires_grad_(is_trainable(name))
        self._eval_norm_names = []
        for module_name, module in self.model.named_modules():
            if not is_norm_layer(module):
                continue
            own = [f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
            own = own or [f"{module_name}.{n}" for n, _ in module.named_buffers(recurse=False)]
            if not own or any(is_trainable(t) for t in own):
                continue  # a trainable norm layer trains as usual
            if spec.norm in ("stats_frozen", "train"):
                for param in module.parameters(recurse=False):
                    param.requires_grad_(True)
            if spec.norm in ("frozen", "stats_frozen"):
                self._eval_norm_names.append(module_name)
        self.freeze_spec = spec
        self.train(self.training)
        return spec

    def use_image_size(self, size: int | None) -> None:
        """Train and evaluate at `size` px (`data.image_size`) instead of the weights' own input
        size: the data config (transforms, feature-cache keys, exports) says so from now on."""
        if size:
            self.data_config = replace(self.data_config, input_size=(3, size, size))

    def set_grad_checkpointing(self) -> str:
        """Recompute each layer group's activations in the backward pass instead of keeping
        them (`activation_checkpointing.py`); returns how, for the log."""
        from transferkit.models.activation_checkpointing import enable_checkpointing

        return enable_checkpointing(self.model, [g.output_module for g in self.groups])

    def freeze_norm_statistics(self) -> int:
        """Keep the running statistics of every batch-norm layer fixed (eval mode), also in
        groups that train; their affine parameters train as their group says. Returns how many
        layers this covers. `freeze` (a new phase) resets it."""
        for module_name, module in self.model.named_modules():
            running = getattr(module, "track_running_stats", False)
            if running and is_norm_layer(module) and module_name not in self._eval_norm_names:
                self._eval_norm_names.append(module_name)
        self.train(self.training)
        return len(self._eval_norm_names)

    def train(self, mode: bool = True) -> Backbone:
        """Like `nn.Module.train`, but normalization layers with frozen statistics stay in eval."""
        super().train(mode)
        if mode and self._eval_norm_names:
            modules = dict(self.model.named_modules())
            for name in self._eval_norm_names:
                modules[name].eval()
        return self

    def group_summary(self) -> list[dict]:
        """Per group: name, parameter count, trainable parameter count and a trainable flag."""
        params = dict(self.model.named_parameters())
        rows = []
        for g in self.groups:
            trainable = sum(
                params[t].numel() for t in g.tensors if t in params and params[t].requires_grad
            )
            rows.append(
                {
                    "name": g.name,
                    "params": g.num_params,
                    "trainable_params": trainable,
                    "trainable": trainable > 0,
                }
            )
        return rows

    # ----------------------------------------------------------------------------- saving
    def save(self, path: str) -> None:
        """Save the weights with their name and preprocessing (loadable with `weights=path`)."""
        from safetensors.torch import save_model

        metadata = {
            "format": "pt",
            "transferkit.backbone": self.name,
            "transferkit.data_config": json.dumps(self.data_config.to_dict()),
        }
        # save_model de-duplicates tied tensors, which safetensors cannot store twice.
        save_model(self.model, str(path), metadata=metadata, force_contiguous=True)
        sort_safetensors_metadata(path)
