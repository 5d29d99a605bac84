"""torchvision classification models behind the `Backbone` contract.

torchvision has no `forward_features` or group matcher, so this adapter supplies them:
the final classification layer is replaced by `nn.Identity` (so `forward` returns the pooled
pre-logits, including hidden classifier layers such as VGG's fc6/fc7), auxiliary heads of
GoogLeNet and Inception are removed, and layer groups come from one rule per model family,
with a generic rule for anything else. The preprocessing comes from the weights enum.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from transferkit.errors import UserError, did_you_mean
from transferkit.models.backbone import Backbone, DataConfig, LayerGroup
from transferkit.models.foreign import KeyMapping, convert_checkpoint, detect_mapping, get_mapping
from transferkit.models.grouping import fallback_groups, groups_from_prefixes
from transferkit.models.offline import reachable, torch_hub_file
from transferkit.models.weights import data_config_from_metadata, load_into, read_weights

_AUX_HEADS = ("aux1", "aux2", "AuxLogits")


def list_models() -> list[str]:
    """Every classification model that torchvision ships."""
    from torchvision import models

    return models.list_models(module=models)


def validate_name(name: str) -> None:
    """Raise a `UserError` with close matches if `name` (optionally `arch.WEIGHTS_TAG`) is unknown."""
    from torchvision import models

    arch, _, tag = name.partition(".")
    known = list_models()
    if arch not in known:
        raise UserError(f"unknown torchvision model {arch!r}.{did_you_mean(arch, known)}")
    if tag:
        tags = [w.name for w in models.get_model_weights(arch)]
        if tag not in tags:
            raise UserError(
                f"unknown weights {tag!r} for torchvision:{arch}.{did_you_mean(tag, tags)} Known: {', '.join(tags)}"
            )


def _weights_enum(name: str):
    from torchvision import models

    arch, _, tag = name.partition(".")
    enum = models.get_model_weights(arch)
    return enum[tag] if tag else enum.DEFAULT


def create(
    name: str, weights: str | None, key_mapping: str | KeyMapping | None = None, **model_kwargs
) -> Backbone:
    """Create `torchvision:<name>` with weights None, 'pretrained' or a local file path.

    `key_mapping` names the layout of a file written by another codebase (see `foreign.py`).
    """
    from torchvision import models

    validate_name(name)
    arch = name.partition(".")[0]
    weights_enum = _weights_enum(name)
    if weights == "pretrained":
        if not torch_hub_file(weights_enum.url).is_file() and not reachable(
            urlparse(weights_enum.url).hostname or ""
        ):
            raise UserError(
                f"could not get pretrained weights for torchvision:{name}: they are not in the "
                f"torch hub cache ({torch.hub.get_dir()}) and {urlparse(weights_enum.url).hostname} "
                "does not answer. Download them once where there is network, or pass a local "
                "file: weights: /path/to/model.pth"
            )
        try:
            model = models.get_model(arch, weights=weights_enum, **model_kwargs)
        except Exception as err:  # noqa: BLE001 - urllib/hash/IO errors when offline
            raise UserError(
                f"could not get pretrained weights for torchvision:{name} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160]}). Offline and not in the torch hub cache "
                f"({torch.hub.get_dir()})? Download them once where there is network, or pass a "
                "local file: weights: /path/to/model.pth (or --weights FILE)"
            ) from None
    else:
        model = models.get_model(arch, **model_kwargs)
    # A foreign file maps onto the full model, whose classifier it has.
    full_state = model.state_dict() if weights not in (None, "pretrained") else {}
    classifier_path, num_features = _strip_heads(model)
    data_config = _data_config(weights_enum)
    report = None
    if weights not in (None, "pretrained"):
        state, metadata = read_weights(weights)
        mapping = get_mapping(key_mapping) if key_mapping else detect_mapping(state)
        if mapping is not None:
            state = convert_checkpoint(state, mapping, full_state, weights)
        report = load_into(
            model, state, str(weights), f"torchvision:{arch}", (classifier_path, *_AUX_HEADS)
        )
        data_config = data_config_from_metadata(metadata) or data_config
    return Backbone(
        model, f"torchvision:{name}", num_features, data_config, _family_groups(model), report
    )


def _strip_heads(model: nn.Module) -> tuple[str, int]:
    """Remove auxiliary heads, replace the final classifier by Identity; return (path, in features)."""
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        for attr in _AUX_HEADS:
            if hasattr(model, attr):
                setattr(model, attr, None)
    candidates = [
        path
        for path, m in model.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == 1000)
        or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)
    ]
    if not candidates:
        raise UserError(
            f"cannot find the classifier of {type(model).__name__}: no layer with 1000 outputs"
        )
    path = candidates[-1]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    return path, int(
        original.in_features if isinstance(original, nn.Linear) else original.in_channels
    )


def _data_config(weights_enum) -> DataConfig:
    transform = weights_enum.transforms()
    crop = int(transform.crop_size[0])
    resize = int(transform.resize_size[0])
    return DataConfig(
        input_size=(3, crop, crop),
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
        interpolation=transform.interpolation.value,
        crop_pct=round(crop / resize, 4),
        crop_mode="center",
    )


# ------------------------------------------------------------------------------ family rules
Rules = list[tuple[str, list[str]]]


def _children(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, _ in module.named_children()]


def _resnet(m: nn.Module) -> Rules:
    return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]


def _regnet(m: nn.Module) -> Rules:
    return [("stem", ["stem"])] + [
        (p.split(".")[-1], [p]) for p in _children(m.trunk_output, "trunk_output")
    ]


def _shufflenet(m: nn.Module) -> Rules:
    return [
        ("stem", ["conv1"]),
        ("stage2", ["stage2"]),
        ("stage3", ["stage3"]),
        ("stage4", ["stage4"]),
        ("conv5", ["conv5"]),
    ]


def _googlenet(m: nn.Module) -> Rules:
    return [
        ("stem", ["conv1", "conv2", "conv3"]),
        ("inception3", ["inception3a", "inception3b"]),
        ("inception4", [f"inception4{c}" for c in "abcde"]),
        ("inception5", ["inception5a", "inception5b"]),
    ]


def _inception3(m: nn.Module) -> Rules:
    return [
        (
            "stem",
            ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"],
        ),
        ("mixed5", ["Mixed_5b", "Mixed_5c", "Mixed_5d"]),
        ("mixed6", ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]),
        ("mixed7", ["Mixed_7a", "Mixed_7b", "Mixed_7c"]),
    ]


def _densenet(m: nn.Module) -> Rules:
    rules: Rules = [("stem", ["features.conv0", "features.norm0"])]
    for name, _ in m.features.named_children():
        if name.startswith("denseblock"):
            rules.append((name, [f"features.{name}"]))
        elif name.startswith("transition") or name == "norm5":
            rules[-1][1].append(f"features.{name}")
    return rules


def _split_at_pools(m: nn.Module) -> Rules:
    """VGG, AlexNet, SqueezeNet: blocks of `features` between max-pools, then hidden FC layers."""
    rules: Rules = []
    current: list[str] = []
    for name, layer in m.features.named_children():
        if isinstance(layer, nn.MaxPool2d):
            if current:
                rules.append((f"block{len(rules)}", current))
            current = []
        elif any(True for _ in layer.parameters()):
            current.append(f"features.{name}")
    if current:
        rules.append((f"block{len(rules)}", current))
    rules[0] = ("stem", rules[0][1])  # the convolutions before the first pool act as the stem
    return rules + [("classifier", ["classifier"])]


def _sequential_features(m: nn.Module) -> Rules:
    """EfficientNet, MobileNetV2/V3: stem, then each child of `features`, then hidden FC layers."""
    paths = _children(m.features, "features")
    return [("stem", [paths[0]])] + [(p, [p]) for p in paths[1:]] + [("classifier", ["classifier"])]


def _staged_features(final_norm: str) -> Callable[[nn.Module], Rules]:
    """ConvNeXt, Swin: `features` alternates stages with downsampling layers."""

    def rules(m: nn.Module) -> Rules:
        paths = _children(m.features, "features")
        out: Rules = [("stem", [paths[0]]), ("stage1", [paths[1]])]
        for i in range(2, len(paths), 2):
            out.append((f"stage{i // 2 + 1}", paths[i : i + 2]))
        return out + [("norm", [final_norm])]

    return rules


def _mnasnet(m: nn.Module) -> Rules:
    stacks = [(f"stack{i - 7}", [f"layers.{i}"]) for i in range(8, 14)]
    return (
        [("stem", [f"layers.{i}" for i in range(8)])]
        + stacks
        + [("head_conv", ["layers.14", "layers.15"])]
    )


def _vit(m: nn.Module) -> Rules:
    blocks = [
        (f"block{i}", [p]) for i, p in enumerate(_children(m.encoder.layers, "encoder.layers"))
    ]
    return (
        [("stem", ["conv_proj", "class_token", "encoder.pos_embedding"])]
        + blocks
        + [("norm", ["encoder.ln"])]
    )


def _maxvit(m: nn.Module) -> Rules:
    blocks = [(f"block{i}", [p]) for i, p in enumerate(_children(m.blocks, "blocks"))]
    return [("stem", ["stem"])] + blocks + [("classifier", ["classifier"])]


FAMILY_RULES: dict[str, Callable[[nn.Module], Rules]] = {
    "ResNet": _resnet,
    "RegNet": _regnet,
    "ShuffleNetV2": _shufflenet,
    "GoogLeNet": _googlenet,
    "Inception3": _inception3,
    "DenseNet": _densenet,
    "VGG": _split_at_pools,
    "AlexNet": _split_at_pools,
    "SqueezeNet": _split_at_pools,
    "EfficientNet": _sequential_features,
    "MobileNetV2": _sequential_features,
    "MobileNetV3": _sequential_features,
    "MNASNet": _mnasnet,
    "ConvNeXt": _staged_features("classifier.0"),
    "SwinTransformer": _staged_features("norm"),
    "VisionTransformer": _vit,
    "MaxVit": _maxvit,
}


def _family_groups(model: nn.Module) -> list[LayerGroup]:
    """Layer groups from the family rule for this model class, or the generic fallback."""
    rule = FAMILY_RULES.get(type(model).__name__)
    return groups_from_prefixes(model, rule(model)) if rule else fallback_groups(model)
