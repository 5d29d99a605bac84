"""A backbone with one head per task: `dict[task, Tensor]` out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from transferkit.core import task_of
from transferkit.errors import UserError
from transferkit.models.backbone import Backbone
from transferkit.models.heads import AuxHead, AuxHeadSpec, Head, TaskSpec


class MultiTaskModel(nn.Module):
    """`MultiTaskModel(backbone, heads)` returns `{task: output}` (and `{"task@group": output}`
    for auxiliary heads on intermediate groups).

    Args:
        backbone: a `Backbone` from `create_backbone`.
        heads: task specs (a head is built for each), or a mapping from task name to a spec
            or to any `nn.Module` that maps `[B, num_features]` to the task's output.
        aux_heads: auxiliary heads, each on the feature map of one backbone group.
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: Sequence[TaskSpec] | Mapping[str, TaskSpec | nn.Module],
        aux_heads: Sequence[AuxHeadSpec] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        items = (
            heads.items() if isinstance(heads, Mapping) else [(spec.name, spec) for spec in heads]
        )
        self.tasks: dict[str, TaskSpec | None] = {}
        modules: dict[str, nn.Module] = {}
        for name, head in items:
            if name in modules:
                raise UserError(f"task {name!r} is defined twice")
            if isinstance(head, TaskSpec):
                self.tasks[name] = head
                modules[name] = Head(head, backbone.num_features)
            else:
                self.tasks[name] = None
                modules[name] = head
        if not modules:
            raise UserError("a MultiTaskModel needs at least one task head")
        self.heads = nn.ModuleDict(modules)
        self.aux_specs = list(aux_heads)
        self.aux_heads = nn.ModuleDict(self._build_aux_heads(self.aux_specs))

    def _build_aux_heads(self, specs: Sequence[AuxHeadSpec]) -> dict[str, nn.Module]:
        if not specs:
            return {}
        for spec in specs:
            if self.tasks.get(spec.task) is None:
                raise UserError(
                    f"auxiliary head {spec.key!r}: task {spec.task!r} must be one of the spec-built "
                    f"tasks ({', '.join(k for k, v in self.tasks.items() if v is not None)})"
                )
            self.backbone.group(spec.group)  # clear error for an unknown group
        shapes = self.feature_map_shapes([s.group for s in specs])
        return {
            _module_key(s): AuxHead(self.tasks[s.task], shapes[s.group], s.hidden, s.dropout)
            for s in specs
        }

    def feature_map_shapes(self, group_names: Sequence[str]) -> dict[str, torch.Size]:
        """Shapes of the groups' feature maps for one input of the data config's size.

        Runs in eval mode without gradients, so BatchNorm statistics are untouched.
        """
        was_training = self.backbone.training
        param = next(self.backbone.parameters())
        probe = torch.zeros(
            1, *self.backbone.data_config.input_size, device=param.device, dtype=param.dtype
        )
        self.backbone.eval()
        try:
            with torch.no_grad():
                _, maps = self.backbone.forward_with_maps(probe, group_names)
        finally:
            self.backbone.train(was_training)
        return {name: maps[name].shape for name in group_names}

    def forward(
        self, images: torch.Tensor | None = None, *, features: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """`[B, 3, H, W]` images -> `{task or "task@group": output}`.

        `features=` takes pooled backbone features `[B, num_features]` instead of images (the
        feature cache); auxiliary heads then have no feature maps and are left out.
        """
        if features is not None:
            return {name: head(features) for name, head in self.heads.items()}
        if self.aux_specs:
            features, maps = self.backbone.forward_with_maps(
                images, [s.group for s in self.aux_specs]
            )
        else:
            features, maps = self.backbone(images), {}
        outputs = {name: head(features) for name, head in self.heads.items()}
        for spec in self.aux_specs:
            outputs[spec.key] = self.aux_heads[_module_key(spec)](maps[spec.group])
        return outputs

    @property
    def output_keys(self) -> list[str]:
        """Every output this model returns from images: tasks, then auxiliary heads."""
        return [*self.heads.keys(), *(spec.key for spec in self.aux_specs)]

    def head_of(self, output_key: str) -> nn.Module:
        """The head module that produces `output_key` (a task or an auxiliary head)."""
        if output_key in self.heads:
            return self.heads[output_key]
        return self.aux_heads[output_key.replace(".", "_")]

    task_of = staticmethod(task_of)  # 'digit@layer2' -> 'digit'


def _module_key(spec: AuxHeadSpec) -> str:
    # Module names cannot contain '.', which group names such as 'blocks.3' do.
    return spec.key.replace(".", "_")
