"""`transferkit inspect`: the table, the JSON contract, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transferkit.cli import main

CLI = Path(sys.executable).parent / "transferkit"


def run_json(capsys, *args) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "spec",
    [
        "timm:resnet18",
        "torchvision:resnet18",
        "torchvision:vit_b_16",
        "timm:vit_small_patch16_224.augreg_in21k",
    ],
)
def test_json_contract(capsys, spec):
    report = run_json(capsys, spec, "--freeze", "up_to:1")
    assert {"backbone", "num_features", "data_config", "total_params", "groups"} <= report.keys()
    assert report["backbone"] == spec
    groups = report["groups"]
    assert sum(g["params"] for g in groups) == report["total_params"]
    assert [g["trainable"] for g in groups[:2]] == [False, False]
    assert all(g["trainable"] for g in groups[2:])
    assert {"name", "params", "trainable"} <= groups[0].keys()
    assert len(report["data_config"]["input_size"]) == 3


def test_json_matches_the_model(capsys):
    import timm

    report = run_json(capsys, "timm:resnet18")
    model = timm.create_model("resnet18", num_classes=0)
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    assert report["num_features"] == 512
    assert [g["name"] for g in report["groups"]] == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_table_output(capsys):
    assert main(["inspect", "torchvision:resnet18", "--freeze", "all@norm=stats_frozen"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "features: 512" in out and "preprocessing: input 3x224x224" in out
    assert "partly" in out  # BatchNorm affine parameters train under stats_frozen


def test_inspect_a_local_file(tmp_path, capsys):
    from transferkit.models import create_backbone

    path = tmp_path / "b.safetensors"
    create_backbone("timm:test_resnet").save(path)
    report = run_json(capsys, "timm:test_resnet", "--weights", str(path))
    assert report["load_report"].startswith("loaded")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["timm:resnet81"], "Did you mean: resnet18"),
        (["torchvision:resnt50"], "Did you mean: resnet50"),
        (["timm:resnet18.nonexistent_tag"], "unknown pretrained tag"),
        (["resnet18"], "SOURCE:NAME"),
        (["timm:resnet18", "--freeze", "up_to:layer9"], "Did you mean: layer4"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = subprocess.run(
        [str(CLI), "inspect", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert message in result.stderr
    error_lines = [
        line for line in result.stderr.splitlines() if line.startswith("transferkit: error")
    ]
    assert len(error_lines) == 1 and "Traceback" not in result.stderr
