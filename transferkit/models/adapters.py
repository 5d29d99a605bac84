"""Parameter-efficient fine-tuning with `peft`: adapters injected into a backbone's layers.

    spec = AdapterSpec("lora", r=8, alpha=16, targets=("blocks.2", "regex:attn"))
    attach_adapter(backbone, spec)     # peft.inject_adapter_in_model on backbone.model
    ...train...
    merge_adapters(model)              # folds the adapter into the base weights, for export

peft is applied to the backbone's wrapped model only (`inject_adapter_in_model`, no PeftModel),
so the task heads stay plain modules that train fully and are saved with the rest of the model:
the trap of a PeftModel whose trained head is lost on save and reload (peft#577) cannot happen.

Targets name layer groups (every Linear and Conv2d whose weight is in the group) or
`regex:PATTERN` (every Linear and Conv2d whose module name matches, `re.search`). Grouped and
depthwise convolutions are left out (peft can adapt them only when the rank divides the groups,
and cannot merge them), and so are subclasses with their own forward (timm's Conv2dSame). Layers are renamed by peft (`qkv.weight` becomes `qkv.base_layer.weight`),
so the backbone's layer groups are rebuilt: adapter weights join the group of the layer they
adapt, and freeze specs, per-group learning rates and `inspect` see them there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from torch import nn

from transferkit.errors import UserError, did_you_mean
from transferkit.models.backbone import LayerGroup

if TYPE_CHECKING:
    from transferkit.models.backbone import Backbone

ADAPTER_METHODS: tuple[str, ...] = ("lora", "dora", "loha", "ia3")
ADAPTABLE = (nn.Linear, nn.Conv2d)
BASE = ".base_layer."  # peft's name for the wrapped layer inside an adapted module


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter: the peft method, its rank and scale, and the layers it targets.

    `train_rest`: in the groups a phase trains, the layers without an adapter train too (only
    the adapted weights stay frozen); by default only the adapter weights train, as in peft.
    """

    method: str
    targets: tuple[str, ...]
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    train_rest: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterSpec:
        return cls(**{**data, "targets": tuple(data["targets"])})

    def peft_config(self, modules: list[str]):
        """The peft config for these module names (full names, so each matches one module)."""
        from peft import IA3Config, LoHaConfig, LoraConfig

        if self.method in ("lora", "dora"):
            return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                              target_modules=modules, use_dora=self.method == "dora")  # fmt: skip
        if self.method == "loha":
            return LoHaConfig(r=self.r, alpha=self.alpha, module_dropout=self.dropout,
                              target_modules=modules)  # fmt: skip
        if self.method == "ia3":
            return IA3Config(target_modules=modules, feedforward_modules=[])
        raise UserError(
            f"unknown adapter method {self.method!r}: use one of {', '.join(ADAPTER_METHODS)}"
        )


@dataclass(frozen=True)
class AttachedAdapter:
    """What `Backbone.freeze` needs to know about an adapter in the model."""

    spec: AdapterSpec
    modules: tuple[str, ...]  # adapted module names, relative to the wrapped model
    tensors: frozenset[str]  # the adapter's own parameters

    def restrict(self, trainable: Callable[[str], bool]) -> Callable[[str], bool]:
        """A freeze predicate narrowed to adapters (and with `train_rest`, unadapted layers)."""
        rest = self.spec.train_rest
        return lambda name: (
            trainable(name) and (name in self.tensors or (rest and BASE not in f".{name}"))
        )

    @property
    def num_params(self) -> int:
        return len(self.tensors)


def _target_modules(backbone: Backbone, targets: tuple[str, ...]) -> list[str]:
    """Names of the Linear/Conv2d modules the targets select; a target that selects none is an
    error that names the valid groups."""
    if not targets:
        raise UserError("model.adapter.targets: name at least one layer group or regex:PATTERN")
    layers = {name: module for name, module in backbone.model.named_modules() if _adaptable(module)}
    chosen: list[str] = []
    for target in targets:
        if target.startswith("regex:"):
            try:
                pattern = re.compile(target[len("regex:") :])
            except (re.error, OverflowError, RecursionError) as err:
                raise UserError(f"model.adapter.targets: bad regex {target!r}: {err}") from None
            found = [name for name in layers if pattern.search(name)]
        else:
            if target not in backbone.group_names:
                raise UserError(
                    f"model.adapter.targets: {target!r} is no layer group of {backbone.name}."
                    f"{did_you_mean(target, backbone.group_names)} Groups: "
                    f"{', '.join(backbone.group_names)}; or write regex:PATTERN"
                )
            members = set(backbone.group(target).tensors)
            found = [name for name in layers if f"{name}.weight" in members]
        if not found:
            raise UserError(
                f"model.adapter.targets: {target!r} matches no Linear or Conv2d layer of "
                f"{backbone.name} (depthwise and 'same'-padding convolutions are left out); see the layer names "
                f"with `transferkit inspect {backbone.name}` or target a group"
            )
        chosen += [name for name in found if name not in chosen]
    return chosen


def _adaptable(module: nn.Module) -> bool:
    """A plain Linear or Conv2d: peft's adapters redo the layer's computation from its fixed
    attributes, so a subclass with its own forward (timm's Conv2dSame, which pads at run time)
    would get an adapter output of another shape, and grouped convolutions cannot be merged."""
    return (
        isinstance(module, ADAPTABLE)
        and type(module).forward in (nn.Linear.forward, nn.Conv2d.forward)
        and getattr(module, "groups", 1) == 1
    )


def attach_adapter(backbone: Backbone, spec: AdapterSpec) -> AttachedAdapter:
    """Inject the adapter into `backbone.model` (in place) and rebuild its layer groups."""
    from peft import inject_adapter_in_model

    if backbone.adapter is not None:
        raise UserError(f"{backbone.name} already has an adapter; merge it first")
    modules = _target_modules(backbone, spec.targets)
    before = {name: backbone.group_of(name) for name in backbone.model.state_dict(keep_vars=True)}
    inject_adapter_in_model(spec.peft_config(modules), backbone.model)
    own: set[str] = set()

    def owner_group(name: str) -> str:
        if name in before:
            return before[name]
        if BASE in f".{name}":
            return before[f".{name}".replace(BASE, ".")[1:]]
        module = max((m for m in modules if name.startswith(m + ".")), key=len)
        own.add(name)
        return before[f"{module}.weight"]

    backbone.set_groups(_regrouped(backbone, owner_group))
    params = {name for name, _ in backbone.model.named_parameters()}
    backbone.adapter = AttachedAdapter(spec, tuple(modules), frozenset(own & params))
    backbone.freeze(backbone.freeze_spec)
    return backbone.adapter


def _regrouped(backbone: Backbone, owner_group: Callable[[str], str]) -> list[LayerGroup]:
    members: dict[str, list[str]] = {g.name: [] for g in backbone.groups}
    for name in backbone.model.state_dict(keep_vars=True):
        members[owner_group(name)].append(name)
    return [LayerGroup(g.name, tuple(members[g.name]), g.output_module) for g in backbone.groups]


def adapter_state(backbone: Backbone) -> tuple[dict, dict]:
    """(peft's adapter state dict, its config as a dict): what peft's `save_pretrained` writes."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(backbone.model)
    config = backbone.model.peft_config["default"].to_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, config


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (peft's `merge`) and put the plain layer back.

    Takes a `MultiTaskModel` or a `Backbone` and returns it, changed in place: the same
    predictions from plain timm/torchvision layers, ready for export. A model without an
    adapter is returned unchanged.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    backbone = getattr(model, "backbone", model)
    if getattr(backbone, "adapter", None) is None:
        return model
    before = dict(backbone._group_of)
    for name, module in list(backbone.model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(backbone.model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(backbone.model, "peft_config"):
        del backbone.model.peft_config
    backbone.adapter = None
    backbone.set_groups(
        _regrouped(backbone, lambda name: before.get(name) or before[_adapted_name(name, before)])
    )
    backbone.freeze(backbone.freeze_spec)
    return model


def _adapted_name(name: str, before: dict) -> str:
    """The name a plain tensor had inside the adapted module (`qkv.weight` <- `qkv.base_layer.weight`)."""
    module, _, leaf = name.rpartition(".")
    return f"{module}{BASE}{leaf}" if module else f"base_layer.{leaf}"
