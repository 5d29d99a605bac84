"""WiSE-FT (`transferkit interpolate`): the two ends are the two models, the mix is linear, the
curve is evaluated and written, and bad starts get one clear error."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK, ROOT

import transferkit
from transferkit.cli import main
from transferkit.data.images import open_image
from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.inference.run import load
from transferkit.models import MultiTaskModel, create_backbone
from transferkit.recipes import load_recipe
from transferkit.rundir.folder import RunDir
from transferkit.runs import evaluate_run
from transferkit.runs.wise_ft import check_same_architecture, interpolated, mix, parse_alphas


@pytest.fixture(scope="module")
def tuned_run(workdir, source_run):
    """A short run of digits_transfer from the digits 0-4 run's backbone, fine-tuning every
    group but the stem from the first step (whichever epoch is kept, the backbone moved), with
    its BatchNorm statistics updating, so that they differ from the start's too."""
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        overrides = [*QUICK, "train.epochs=3", "data.max_samples=64",
                     f"model.weights={source_run / 'model.safetensors'}",
                     "schedule.phases=[{from_epoch: 0, freeze: 'up_to:stem'}]",
                     "schedule.norm_stats=train"]  # fmt: skip
        recipe = load_recipe(ROOT / "recipes/digits_transfer.yaml", overrides)
        return train(recipe, output=str(workdir / "runs" / "wise_transfer")).resolve()
    finally:
        os.chdir(cwd)


def cli_env() -> dict[str, str]:
    """The environment for a `python -m transferkit.cli` subprocess that imports this checkout."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _images(workdir: Path, count: int = 6) -> list[Path]:
    return sorted((workdir / "data/digits/transfer/images").glob("*.png"))[:count]


def _outputs(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(images)


def test_alpha_one_is_the_run_and_alpha_zero_its_start(workdir, source_run, tuned_run):
    run = load(tuned_run)
    images = torch.stack([run.transform(open_image(p))
                          for p in _images(workdir)])  # fmt: skip
    one = interpolated(tuned_run, 1.0)
    for name, value in _outputs(run.model, images).items():
        assert torch.allclose(_outputs(one.model, images)[name], value, atol=1e-6)

    zero = interpolated(tuned_run, 0.0)
    start = create_backbone("timm:test_resnet", str(source_run / "model.safetensors"))
    tuned = one.model.backbone.model.state_dict()
    for key, value in start.model.state_dict().items():
        # Floats are the start's; BatchNorm's step counters stay the run's (see `mix`).
        expected = value if value.is_floating_point() else tuned[key]
        assert torch.equal(zero.model.backbone.model.state_dict()[key], expected), key
    start.data_config = run.model.backbone.data_config
    reference = MultiTaskModel(start, list(run.tasks.values()))
    reference.heads.load_state_dict(run.model.heads.state_dict())  # the fine-tuned heads
    expected = _outputs(reference, images)
    for name, value in _outputs(zero.model, images).items():
        assert torch.allclose(value, expected[name], atol=1e-6)
    # The fine-tuning moved the backbone, BatchNorm statistics included: the ends differ.
    moved = [k for k, v in start.model.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, tuned[k])]  # fmt: skip
    assert any("running_mean" in k for k in moved) and any(k.endswith("weight") for k in moved)


def test_mix_is_linear_in_every_float_tensor_and_keeps_counters():
    start = {
        "w": torch.zeros(3),
        "bn.running_var": torch.ones(2),
        "bn.num_batches_tracked": torch.tensor(0),
    }
    tuned = {"w": torch.full((3,), 4.0), "bn.running_var": torch.full((2,), 3.0),
             "bn.num_batches_tracked": torch.tensor(7)}  # fmt: skip
    half = mix(start, tuned, 0.25)
    assert torch.equal(half["w"], torch.full((3,), 1.0))
    assert torch.equal(half["bn.running_var"], torch.full((2,), 1.5))
    assert int(half["bn.num_batches_tracked"]) == 7


def test_interpolate_cli_writes_the_curve_and_saves_the_best_mix(
    workdir, tuned_run, monkeypatch, capsys
):
    monkeypatch.chdir(workdir)
    saved = workdir / "runs" / "wise_best"
    assert main(["interpolate", str(tuned_run), "--alpha", "1,0,0.5", "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "validation/digit/accuracy*" in out and "best alpha" in out
    folder = RunDir(tuned_run)
    curve = json.loads(folder.wise_ft_json.read_text())
    assert curve["alphas"] == [0.0, 0.5, 1.0] and folder.wise_ft_plot.stat().st_size > 0
    assert curve["monitor"] == "validation/digit/accuracy"
    # alpha = 1 is the run's own model: the same metrics as `transferkit eval`.
    assert curve["metrics"][-1] == pytest.approx(evaluate_run(tuned_run, device="cpu"))
    best = curve["alphas"].index(curve["best_alpha"])
    assert curve["metrics"][best][curve["monitor"]] == max(
        m[curve["monitor"]] for m in curve["metrics"]
    )
    assert json.loads((saved / "model.json").read_text())["wise_ft"]["alpha"] == curve["best_alpha"]
    assert evaluate_run(saved, device="cpu") == pytest.approx(curve["metrics"][best])


def _fake_run(folder: Path, backbone: str, tuned_run: Path) -> Path:
    """A model folder like a run's, for another architecture with the same tasks."""
    info = RunDir(tuned_run).info()
    model = MultiTaskModel(create_backbone(backbone), list(load(tuned_run).tasks.values()))
    folder.mkdir(parents=True, exist_ok=True)
    RunDir(folder).save_model(model, dataclasses.replace(info, backbone=backbone))
    return folder


def test_other_architectures_and_random_starts_are_one_clear_error(
    workdir, source_run, tuned_run, monkeypatch
):
    other = _fake_run(workdir / "runs" / "other_arch", "timm:test_efficientnet", tuned_run)
    monkeypatch.chdir(workdir)
    with pytest.raises(UserError, match="different architectures"):
        transferkit.interpolate(tuned_run, [0.5], start=str(other))
    with pytest.raises(UserError, match="random weights"):
        interpolated(source_run, 0.5)  # digits_source trains from model.weights: none
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        parse_alphas("0,1.5")
    with pytest.raises(UserError, match="other shapes"):
        check_same_architecture({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, "a", "b")
    result = subprocess.run(
        [sys.executable, "-m", "transferkit.cli", "interpolate", str(tuned_run), "--start", str(other)],
        cwd=workdir, capture_output=True, text=True, timeout=300, env=cli_env(),
    )  # fmt: skip
    assert result.returncode == 2 and "different architectures" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_run_with_an_adapter_is_mixed_with_the_adapter_folded_in(workdir, source_run):
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        overrides = [*QUICK, "train.epochs=2", "data.max_samples=32",
                     f"model.weights={source_run / 'model.safetensors'}",
                     "model.adapter={method: lora, targets: [layer4], r: 2}",
                     "schedule.phases=[{from_epoch: 0, freeze: none}]"]  # fmt: skip
        recipe = load_recipe(ROOT / "recipes/digits_transfer.yaml", overrides)
        run_dir = train(recipe, output=str(workdir / "runs" / "wise_adapter")).resolve()
    finally:
        os.chdir(cwd)
    run = load(run_dir)
    images = torch.stack([run.transform(open_image(p)) for p in _images(workdir)])
    one = interpolated(run_dir, 1.0)  # the adapter merged: plain layers, the run's outputs
    assert one.info.adapter is None
    assert not any("lora_" in k for k in one.model.state_dict())
    for name, value in _outputs(run.model, images).items():
        assert torch.allclose(_outputs(one.model, images)[name], value, atol=1e-4)
    zero = interpolated(run_dir, 0.0)
    start = create_backbone("timm:test_resnet", str(source_run / "model.safetensors"))
    mixed = zero.model.backbone.model.state_dict()
    for key, value in start.model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(mixed[key], value), key
