"""Local weight files for both sources: same tensors, same preprocessing, clear errors."""

from __future__ import annotations

import json
import os
import urllib.error

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from transferkit.errors import UserError
from transferkit.models import DataConfig, create_backbone


def _assert_same_backbone_weights(backbone, reference: dict[str, torch.Tensor]) -> None:
    state = backbone.model.state_dict()
    assert state.keys() <= reference.keys()
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key


def test_timm_safetensors_with_classifier_loads_and_keeps_preprocessing(tmp_path):
    source = timm.create_model("test_resnet.r160_in1k", num_classes=1000)  # a full classifier
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    backbone = create_backbone("timm:test_resnet.r160_in1k", weights=path)

    _assert_same_backbone_weights(backbone, source.state_dict())
    report = backbone.load_report
    assert report.dropped_classifier == ["fc.bias", "fc.weight"]
    assert report.missing == [] and report.unexpected == []
    assert "dropped the source classifier" in str(report)
    expected = DataConfig.from_dict(timm.data.resolve_model_data_config(source))
    assert backbone.data_config == expected
    assert backbone.data_config.input_size == (3, 160, 160) and backbone.data_config.mean == (
        0.5,
        0.5,
        0.5,
    )


def test_torchvision_pth_nested_and_prefixed(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    # As saved by a DDP training script: nested under "state_dict", keys prefixed by "module.".
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path
    )

    backbone = create_backbone("torchvision:resnet18", weights=str(path))

    _assert_same_backbone_weights(backbone, source.state_dict())
    assert backbone.load_report.dropped_classifier == ["fc.bias", "fc.weight"]
    weights = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert backbone.data_config.input_size == (3, weights.crop_size[0], weights.crop_size[0])
    assert backbone.data_config.mean == tuple(weights.mean)
    assert backbone.data_config.crop_pct == pytest.approx(224 / 256)


def test_bin_file_is_read(tmp_path):
    source = timm.create_model("test_vit", num_classes=0)
    path = tmp_path / "pytorch_model.bin"
    torch.save(source.state_dict(), path)
    backbone = create_backbone("timm:test_vit", weights=path)
    _assert_same_backbone_weights(backbone, source.state_dict())


@pytest.mark.parametrize("spec", ["timm:test_efficientnet", "torchvision:mobilenet_v3_small"])
def test_saved_backbone_round_trip_with_its_preprocessing(tmp_path, spec):
    original = create_backbone(spec)
    custom = DataConfig(
        input_size=(3, 48, 48),
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
        interpolation="bicubic",
        crop_pct=1.0,
    )
    original.data_config = custom
    path = tmp_path / "backbone.safetensors"
    original.save(path)

    loaded = create_backbone(spec, weights=path)

    _assert_same_backbone_weights(loaded, original.model.state_dict())
    assert loaded.data_config == custom
    assert loaded.load_report.missing == []


@pytest.mark.parametrize(
    ("target", "file_arch"),
    [
        ("timm:test_resnet", "test_vit"),
        ("timm:resnet18", "resnet34"),
        ("timm:resnet34", "resnet18"),
    ],
)
def test_file_for_another_architecture_is_a_clear_error(tmp_path, target, file_arch):
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model(file_arch, num_classes=0).state_dict(), str(path))
    with pytest.raises(UserError, match=rf"does not fit {target}"):
        create_backbone(target, weights=path)


def test_torchvision_file_for_another_architecture(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    with pytest.raises(UserError, match="does not fit torchvision:resnet18"):
        create_backbone("torchvision:resnet18", weights=path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        create_backbone("timm:test_resnet", weights=tmp_path / "nope.safetensors")
    bad = tmp_path / "weights.txt"
    bad.write_text("hello")
    with pytest.raises(UserError, match="unsupported weights file"):
        create_backbone("timm:test_resnet", weights=bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="cannot read weights file"):
        create_backbone("timm:test_resnet", weights=garbage)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['TRANSFERKIT_PWNED']}",))


def test_pickled_code_in_a_weights_file_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TRANSFERKIT_PWNED", str(marker))
    path = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": timm.create_model("test_resnet").state_dict(), "hook": _Exploit()}, path
    )
    with pytest.raises(UserError, match="weights_only"):
        create_backbone("timm:test_resnet", weights=path)
    assert not marker.exists()


def test_timm_pretrained_offline_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match="pass a local file") as info:
        create_backbone("timm:test_resnet.r160_in1k", weights="pretrained")
    assert "\n" not in str(info.value)


def test_torchvision_pretrained_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    with pytest.raises(UserError, match="pass a local file"):
        create_backbone("torchvision:resnet18", weights="pretrained")


def test_torchvision_weights_tag_selects_preprocessing():
    backbone = create_backbone("torchvision:efficientnet_b0.IMAGENET1K_V1", device="meta")
    transforms = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()
    assert backbone.data_config.input_size[1] == transforms.crop_size[0]
    assert backbone.data_config.interpolation == transforms.interpolation.value
    assert json.loads(json.dumps(backbone.data_config.to_dict()))["crop_mode"] == "center"
