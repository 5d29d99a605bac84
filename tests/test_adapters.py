"""peft adapters (model.adapter): what trains, the run folder, load/predict, merge, resume."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import FULL_LABELS, epoch_end_weights, records
from safetensors.torch import load_file

import transferkit
from transferkit.cli import main
from transferkit.data.images import open_image
from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.models import MultiTaskModel, TaskSpec, create_backbone
from transferkit.models.adapters import AdapterSpec, attach_adapter, merge_adapters
from transferkit.recipes import parse_recipe
from transferkit.runs.export import export_run


def _recipe(backbone: str, adapter: dict, **sections) -> dict:
    recipe = {
        "name": "adapter",
        "seed": 3,
        "model": {"backbone": backbone, "adapter": adapter},
        "tasks": {"digit": {"kind": "multiclass"},
                  "parity": {"kind": "binary", "classes": ["even", "odd"]}},
        "data": {"source": "manifest", "path": FULL_LABELS, "val_split": None, "image_size": 32,
                 "augment": "none", "max_samples": 48},
        "schedule": {"phases": [{"from_epoch": 0, "freeze": "all"},
                                {"from_epoch": 1, "freeze": "none"}]},
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.01, "monitor": "val/digit/accuracy"},
    }  # fmt: skip
    if backbone == "timm:test_vit":
        recipe["model"]["kwargs"] = {"img_size": 32}
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    return recipe


def _tensor_at_epoch(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    step = next(r["step"] for r in records(run_dir) if r["epoch"] == epoch)
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}_end" / "model.safetensors"))


@pytest.mark.parametrize(
    ("backbone", "adapter"),
    [
        ("timm:test_vit", {"method": "lora", "targets": ["blocks.5", "regex:attn\\.qkv"], "r": 4}),
        ("timm:test_resnet", {"method": "loha", "targets": ["layer3", "layer4"], "r": 2}),
    ],
    ids=["vit-lora", "resnet-loha"],
)
def test_adapter_run_trains_adapters_and_heads_and_reloads(
    workdir, labelled, monkeypatch, backbone, adapter
):
    monkeypatch.chdir(workdir)
    out = workdir / "adapters" / backbone.split(":")[1]
    run_dir = train(parse_recipe(_recipe(backbone, adapter)), output=str(out))
    first, last = epoch_end_weights(run_dir, 0), epoch_end_weights(run_dir)
    own = [k for k in last if "lora_" in k or "hada_" in k]
    base = [k for k in last if k.startswith("backbone.") and k not in own]
    heads = [k for k in last if k.startswith("heads.")]
    assert own and base and heads
    # Phase 0 (linear probe) left the adapter at its start; phase 1 trained it and the heads,
    # and no pretrained weight moved, norms included.
    assert any(not torch.equal(first[k], last[k]) for k in own)
    assert all(not torch.equal(first[k], last[k]) for k in heads if k.endswith("weight"))
    assert all(torch.equal(first[k], last[k]) for k in base)
    trainable = records(run_dir)[-1]["trainable_params"]
    assert trainable < sum(v.numel() for v in last.values()) / 4

    # The run folder: the whole model, and peft's adapter files.
    info = json.loads((run_dir / "model.json").read_text())
    assert info["adapter"]["method"] == adapter["method"]
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "loha": "LOHA"}[adapter["method"]]
    shared = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert len(shared) == len(own)

    # peft#577: the reloaded model is the saved epoch's, trained heads included.
    run = transferkit.load(run_dir)
    saved = _tensor_at_epoch(run_dir, info["epoch"])
    state = run.model.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    images = sorted((workdir / "data/digits/transfer/images").iterdir())[:6]
    before = run.predict(images)
    with torch.no_grad():
        x = torch.stack([run.transform(open_image(p)) for p in images])
        logits = run.model(x)
    assert [p["digit"]["label"] for p in before] == [
        run.tasks["digit"].class_names[i] for i in logits["digit"].argmax(1)
    ]
    # Merged for export: plain layers, the same outputs.
    merged = merge_adapters(run.model)
    assert not any("lora_" in k or "hada_" in k or "base_layer" in k for k in merged.state_dict())
    with torch.no_grad():
        after = merged(x)
    for key in logits:
        assert torch.allclose(logits[key], after[key], atol=1e-4)
    # `transferkit export` merges the adapter too: plain layers in the file, within tolerance.
    exported = export_run(run_dir, "onnx")
    assert max(exported.parity.values()) <= exported.tolerance
    names = [t.name for t in onnx.load(str(exported.path)).graph.initializer]
    assert names and not any("lora_" in n or "hada_" in n for n in names)


@pytest.mark.parametrize("method", ["ia3", "dora", "lora"])
def test_other_methods_inject_train_and_merge_on_a_conv_net(method):
    backbone = create_backbone("timm:test_resnet")
    adapter = attach_adapter(backbone, AdapterSpec(method, ("regex:^layer4",), r=2))
    model = MultiTaskModel(backbone, [TaskSpec("digit", "multiclass", 5)])
    backbone.freeze("none")
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter.tensors) and trainable
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()  # batch norm in eval: the merge must reproduce the outputs exactly
    for _ in range(2):
        optimizer.zero_grad()
        model(x)["digit"].pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        expected = model(x)["digit"]
        merged = merge_adapters(model)(x)["digit"]
    assert backbone.adapter is None and torch.allclose(expected, merged, atol=1e-4)


def test_a_group_freeze_with_train_rest_trains_unadapted_layers_too():
    backbone = create_backbone("timm:test_vit", img_size=32)
    attach_adapter(backbone, AdapterSpec("lora", ("regex:fc1",), train_rest=True))
    backbone.freeze("train:blocks.5")
    names = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert "blocks.5.mlp.fc1.lora_A.default.weight" in names and "blocks.5.norm1.weight" in names
    assert "blocks.5.mlp.fc1.base_layer.weight" not in names
    assert not any(n.startswith("blocks.4.") for n in names)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["blocks.9"], "'blocks.9' is no layer group of timm:test_vit"),
        (["regex:nothing_here"], "'regex:nothing_here' matches no Linear or Conv2d layer"),
    ],
)
def test_a_target_that_matches_nothing_is_one_recipe_error(workdir, labelled, targets, message):
    recipe = parse_recipe(_recipe("timm:test_vit", {"method": "lora", "targets": targets}))
    with pytest.raises(UserError, match="model.adapter.targets") as err:
        train(recipe, output=str(workdir / "adapters" / "bad"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_inspect_shows_trainable_parameters_with_an_adapter(capsys):
    args = ["inspect", "timm:test_resnet", "--adapter", "lora", "--adapter-targets", "layer4"]
    assert main([*args, "--adapter-r", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {g["name"]: g for g in report["groups"]}
    assert rows["layer4"]["trainable_params"] > 0 and rows["layer3"]["trainable_params"] == 0
    assert report["trainable_params"] == rows["layer4"]["trainable_params"]
    assert report["adapter"]["modules"] == 3  # conv1, conv2, downsample.1
    assert main(["inspect", "timm:test_resnet", "--adapter", "lora", "--adapter-targets", "x"]) == 2
    assert "no layer group" in capsys.readouterr().err
