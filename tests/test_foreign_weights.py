"""Foreign checkpoints (declared key mappings), packaged pretrained weights, and weights errors."""

from __future__ import annotations

import threading

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from transferkit.errors import UserError
from transferkit.models import create_backbone
from transferkit.models.foreign import KeyMapping, convert_checkpoint
from transferkit.models.weights import load_into


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


def test_key_mapping_needs_a_file():
    with pytest.raises(UserError, match="key_mapping applies to a weights file"):
        create_backbone("timm:test_resnet", None, key_mapping="efficientnet_pytorch")
