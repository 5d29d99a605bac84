"""Fine-tuning regularizers (recipe section `regularizers`): a penalty added to each step's loss.

- L2-SP (Li et al. 2018): alpha/2 ||w - w0||^2 over the backbone's pretrained weights w0, and
  beta/2 ||w||^2 over the weights that have no pretrained value (heads, adapters). Weight decay,
  which pulls towards zero, is then off (`build.py`).
- BSS (Chen et al. 2019): eta * the sum of the k smallest squared singular values of the batch's
  pooled features `[B, D]`, which the heads read.
- DELTA (Li et al. 2019), its feature-map term without channel attention (TLlib's
  `BehavioralRegularization`): beta/2 * ||FM(x) - FM0(x)||^2 per image, averaged over the batch
  and summed over the chosen groups' feature maps, FM0 from a frozen copy of the starting model.

The penalty is one more loss term of the step: every strategy adds its gradient to the task
gradients, after balancing (a regularizer is not a task for MGDA or UW to weigh). Only the
weights that train are penalized: a frozen weight adds a constant. The pretrained start is taken
from the recipe's weights when the run is set up, so a resumed run is regularized towards the
same start, and nothing needs checkpointing. BSS and DELTA need the backbone's forward pass: in
a phase that trains from cached features (frozen backbone) they add nothing. Under several
processes BSS takes the singular values of each process's batch (like BatchNorm's statistics).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from transferkit.errors import UserError
from transferkit.models import MultiTaskModel


def l2_sp_penalty(
    pairs: Iterable[tuple[Tensor, Tensor | None]], alpha: float, beta: float
) -> Tensor:
    """alpha/2 sum ||w - w0||^2 over (w, w0) pairs, plus beta/2 sum ||w||^2 where w0 is None."""
    total: Tensor | float = 0.0
    for weight, start in pairs:
        if start is None:
            total = total + 0.5 * beta * weight.float().pow(2).sum()
        else:
            total = total + 0.5 * alpha * (weight.float() - start).pow(2).sum()
    return torch.as_tensor(total)


def bss_penalty(features: Tensor, k: int) -> Tensor:
    """The sum of the k smallest squared singular values of a `[B, D]` feature matrix."""
    values = torch.linalg.svdvals(features.float().flatten(1))  # descending
    return values[-k:].pow(2).sum()


def delta_penalty(maps: dict[str, Tensor], start_maps: dict[str, Tensor]) -> Tensor:
    """Sum over feature maps of 1/2 ||FM - FM0||^2 per image, averaged over the batch."""
    total: Tensor | float = 0.0
    for name, fm in maps.items():
        diff = fm.float() - start_maps[name].float()
        total = total + 0.5 * diff.pow(2).flatten(1).sum(1).mean()
    return torch.as_tensor(total)


class Regularizers:
    """The recipe's regularizers for one model; `penalty(batch)` after the model's forward."""

    def __init__(self, section, model: MultiTaskModel) -> None:
        self.section, self.model = section, model
        backbone = model.backbone
        self.values: dict[str, torch.Tensor] = {}
        self._captured: dict[str, Tensor] = {}
        adapter = set(backbone.adapter.tensors) if backbone.adapter is not None else set()
        self.start: dict[int, Tensor] = {}
        if section.l2_sp is not None:
            self.start = {
                id(p): p.detach().clone().float()
                for name, p in backbone.model.named_parameters()
                if name not in adapter
            }
        self.teacher, self.groups = None, []
        if section.delta is not None:
            names = section.delta.groups or backbone.group_names
            try:
                self.groups = [backbone.group(g).name for g in names]
            except UserError as err:
                raise UserError(f"regularizers.delta.groups: {err}") from None
            # Copied before the hooks below exist, so the teacher records nothing.
            self.teacher = copy.deepcopy(backbone).eval().requires_grad_(False)
            modules = dict(backbone.model.named_modules())
            for name in self.groups:
                modules[backbone.group(name).output_module].register_forward_hook(
                    self._capture(f"map:{name}")
                )
        if section.bss is not None:
            backbone.model.register_forward_hook(self._capture("features"))

    def _capture(self, key: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            # Only the training forward: not evaluation, the feature cache or FAMO's re-run.
            if torch.is_grad_enabled():
                self._captured[key] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def to(self, device: torch.device) -> Regularizers:
        self.start = {k: v.to(device) for k, v in self.start.items()}
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def penalty(self, batch: dict) -> Tensor | None:
        """The penalty of this step (None when there is none), its parts kept in `values`."""
        section, captured, self._captured = self.section, self._captured, {}
        terms: dict[str, Tensor] = {}
        if section.l2_sp is not None:
            pairs = [(p, self.start.get(id(p))) for p in self.model.parameters() if p.requires_grad]
            terms["l2_sp"] = l2_sp_penalty(pairs, section.l2_sp.alpha, section.l2_sp.beta)
        if section.bss is not None and "features" in captured:
            terms["bss"] = section.bss.eta * bss_penalty(captured["features"], section.bss.k)
        maps = {k.removeprefix("map:"): v for k, v in captured.items() if k.startswith("map:")}
        if self.teacher is not None and maps and "image" in batch:
            with torch.no_grad():
                _, start_maps = self.teacher.forward_with_maps(batch["image"], self.groups)
            terms["delta"] = section.delta.beta * delta_penalty(maps, start_maps)
        self.values = {f"reg/{k}": v.detach() for k, v in terms.items()}  # read when logged
        return sum(terms.values()) if terms else None  # type: ignore[return-value]


def build_regularizers(section, model: MultiTaskModel, device) -> Regularizers | None:
    """The run's regularizers, or None when the recipe asks for none."""
    if all(v is None for v in vars(section).values()):
        return None
    return Regularizers(section, model).to(device)
