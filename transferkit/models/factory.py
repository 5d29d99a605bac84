"""`create_backbone("SOURCE:NAME", weights=...)`: the single entry point for every backbone."""

from __future__ import annotations

from pathlib import Path

import torch

from transferkit.errors import UserError
from transferkit.models.backbone import Backbone
from transferkit.models.foreign import KeyMapping
from transferkit.models.offline import AUTO_WEIGHTS, resolve_auto_weights

SOURCES = ("timm", "torchvision")


def parse_backbone_name(spec: str) -> tuple[str, str]:
    """Split 'timm:resnet18' into ('timm', 'resnet18') with a clear error for anything else."""
    source, sep, name = str(spec).partition(":")
    if not sep or source not in SOURCES or not name:
        raise UserError(
            f"backbone must be written SOURCE:NAME with SOURCE one of {', '.join(SOURCES)} "
            f"(e.g. timm:resnet18, torchvision:resnet50), got {spec!r}"
        )
    return source, name


def normalize_weights(weights: str | Path | None) -> str | None:
    """None/'none'/'random' -> None (random init), 'pretrained' -> library weights, else a path."""
    if weights is None or str(weights).lower() in ("none", "random", ""):
        return None
    if str(weights).lower() == "pretrained":
        return "pretrained"
    return str(weights)


def create_backbone(
    spec: str,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    key_mapping: str | KeyMapping | None = None,
    **model_kwargs,
) -> Backbone:
    """Build a backbone from `timm:<name>` or `torchvision:<name>`.

    Args:
        spec: `SOURCE:NAME`; timm names may carry a pretrained tag (`vit_small_patch16_224.augreg_in21k`),
            torchvision names a weights enum member (`resnet50.IMAGENET1K_V2`).
        weights: `None` (random init), `"pretrained"` (the library's hub or cache; for timm models
            listed in `packaged.PACKAGED`, an installed package's checkpoint when the cache has
            none), `"auto"` (pretrained where they load offline, else random: `offline.py`), or a
            local file (`.safetensors`, `.pth`, `.bin`, or a backbone saved by `Backbone.save`).
        device: build on this device; `"meta"` gives the structure only, without memory, which is
            what `transferkit inspect` uses for large models without weights.
        key_mapping: the layout of a weights file written by another codebase: a name in
            `foreign.MAPPINGS` (e.g. `"efficientnet_pytorch"`) or a `KeyMapping`. Registered
            layouts are also recognised from the file's keys.
        **model_kwargs: passed to the library's constructor (e.g. timm `img_size=64`,
            torchvision `image_size=64` for ViTs, `drop_path_rate=0.1`).
    """
    source, name = parse_backbone_name(spec)
    if weights == AUTO_WEIGHTS:  # pretrained where they load offline, else random
        weights = resolve_auto_weights(spec, weights)[0]
    weights = normalize_weights(weights)
    if key_mapping is not None and weights in (None, "pretrained"):
        raise UserError(f"key_mapping applies to a weights file, but weights is {weights!r}")
    if source == "timm":
        from transferkit.models import timm_adapter as adapter
    else:
        from transferkit.models import torchvision_adapter as adapter
    if str(device) == "meta" and weights is None:
        # Accelerate's context moves each parameter to meta as it is registered, so builders that
        # compute on tensors (torchvision's RegNet) still work, and nothing is allocated.
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return adapter.create(name, None, **model_kwargs)
    backbone = adapter.create(name, weights, key_mapping=key_mapping, **model_kwargs)
    return backbone if device is None else backbone.to(device)
