"""Calibration (ECE, `transferkit calibrate`, temperatures in predict and eval) and test-time
augmentation (views, the recipe's default, forbidden flips)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import ROOT
from torchvision.transforms import v2

import transferkit
from transferkit.cli import main
from transferkit.data import build_transforms
from transferkit.data.transforms import tta_views
from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.inference.run import AdjustedModel, parse_tta
from transferkit.models import DataConfig, TaskSpec
from transferkit.recipes import load_recipe
from transferkit.runs.calibration import fit_temperature, nll

DIGIT = TaskSpec("digit", "multiclass", 4)
EVEN = TaskSpec("even", "binary")


@pytest.mark.parametrize("task", [DIGIT, EVEN], ids=lambda t: t.kind)
def test_temperature_fit_recovers_an_overconfident_scale(task):
    generator = torch.Generator().manual_seed(0)
    shape = (6000, 4) if task.kind == "multiclass" else (6000,)
    calibrated = torch.randn(shape, generator=generator) * 1.5
    if task.kind == "multiclass":
        target = torch.multinomial(calibrated.softmax(-1), 1, generator=generator).squeeze(1)
    else:
        target = torch.bernoulli(calibrated.sigmoid(), generator=generator)
    # The model's logits are 3x too confident: the fitted temperature undoes it.
    temperature = fit_temperature(task, calibrated * 3, target)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert nll(task, calibrated * 3 / temperature, target) < nll(task, calibrated * 3, target)


def test_tta_views_and_their_average():
    images = torch.randn(2, 3, 16, 16)
    views = tta_views(images, ["hflip", "crops"])
    assert len(views) == 7 and all(v.shape == images.shape for v in views)
    assert torch.equal(views[1], images.flip(-1))
    # The top-left crop is the top-left 14x14 corner, resized back to 16x16.
    assert torch.allclose(views[2][..., 0, 0], images[..., 0, 0], atol=0.3)

    class Probe(torch.nn.Module):
        def forward(self, x):
            return {"digit": x[:, 0, :, :4].mean((1, 2)).unsqueeze(1).repeat(1, 4), "aux@x": x}

    model = AdjustedModel(Probe(), {"digit": DIGIT}, ["hflip"], {"digit": 2.0})
    expected = (Probe()(images)["digit"] + Probe()(images.flip(-1))["digit"]) / 2 / 2.0
    out = model(images)
    assert set(out) == {"digit"} and torch.allclose(out["digit"], expected)


def test_flips_follow_data_horizontal_flip():
    from torchvision import transforms as v1

    config = DataConfig(input_size=(3, 32, 32))
    flips = (v1.RandomHorizontalFlip, v2.RandomHorizontalFlip)
    for library in ("timm", "torchvision"):  # timm's (today's) and the older runs' presets
        steps = build_transforms(config, True, "light", 32, hflip=False, library=library).transforms
        assert not any(isinstance(s, flips) for s in steps)
        steps = build_transforms(config, True, "light", 32, library=library).transforms
        assert any(isinstance(s, flips) for s in steps)
    assert parse_tta("hflip, crops") == ["hflip", "crops"] and parse_tta("none") == []
    with pytest.raises(UserError, match="unknown view 'flip'"):
        parse_tta("flip")


@pytest.fixture(scope="module")
def digits_run(workdir):
    """A short transfer run: digits must not be mirrored; crops are its default TTA."""
    overrides = ["model.weights=none", "data.max_samples=96", "train.batch_size=16",
                 "train.epochs=3", "data.horizontal_flip=false", "data.tta=[crops]",
                 "schedule.phases.1.from_epoch=1", "train.lr=0.01"]  # fmt: skip
    import os

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        recipe = load_recipe(ROOT / "recipes/digits_transfer.yaml", overrides)
        return train(recipe, output=str(workdir / "calibration" / "digits"))
    finally:
        os.chdir(cwd)


def test_calibrate_stores_temperatures_that_predict_and_eval_use(
    digits_run, workdir, monkeypatch, capsys
):
    monkeypatch.chdir(workdir)
    records = [json.loads(x) for x in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= records[-1]["val/digit/ece"] <= 1 and "val/ink/ece" not in records[-1]
    capsys.readouterr()
    assert main(["eval", str(digits_run), "--tta", "none", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    # Single views here (the recipe's default, crops, has its own test below).
    assert main(["calibrate", str(digits_run), "--tta", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"digit", "parity"}  # classification tasks only
    for row in report.values():
        assert row["temperature"] > 0 and row["nll_after"] <= row["nll_before"] + 1e-6
    info = json.loads((digits_run / "model.json").read_text())
    assert info["temperatures"] == {n: r["temperature"] for n, r in report.items()}
    assert (digits_run / "reliability.png").read_bytes()[:4] == b"\x89PNG"

    run = transferkit.load(digits_run)
    image = sorted((workdir / "data/digits/transfer/images").iterdir())[0]
    _, probs = next(run.probabilities([str(image)], device="cpu", tta=[]))
    from transferkit.data.images import open_image

    logits = run.model(run.transform(open_image(image)).unsqueeze(0))
    t = report["digit"]["temperature"]
    assert torch.allclose(probs["digit"], (logits["digit"] / t).softmax(-1), atol=1e-6)
    assert torch.allclose(
        probs["parity"], (logits["parity"] / report["parity"]["temperature"]).sigmoid(), atol=1e-6
    )
    assert torch.allclose(probs["ink"], logits["ink"], atol=1e-6)  # regression: untouched

    assert main(["eval", str(digits_run), "--tta", "none", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    # A temperature changes confidence, not the predicted class: accuracy and F1 stay, and a
    # binary task's AUROC (a monotone map of one logit); ECE is the fit's.
    for key in ("digit/accuracy", "digit/f1", "parity/accuracy", "parity/auroc"):
        assert after[f"validation/{key}"] == pytest.approx(before[f"validation/{key}"], abs=1e-6)
    assert after["validation/digit/ece"] == pytest.approx(report["digit"]["ece_after"], abs=1e-6)
    assert before["validation/digit/ece"] == pytest.approx(report["digit"]["ece_before"], abs=1e-6)


def test_tta_in_predict_and_eval_follows_the_recipe(digits_run, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    image = str(sorted((workdir / "data/digits/transfer/images").iterdir())[1])
    run = transferkit.load(digits_run)
    default = next(run.probabilities([image], device="cpu"))[1]
    crops = next(run.probabilities([image], device="cpu", tta=["crops"]))[1]
    plain = next(run.probabilities([image], device="cpu", tta=[]))[1]
    assert torch.equal(default["digit"], crops["digit"])  # the recipe's data.tta: [crops]
    assert not torch.allclose(crops["digit"], plain["digit"])
    capsys.readouterr()
    assert main(["predict", str(digits_run), image, "--tta", "hflip", "--json"]) == 2
    assert "data.horizontal_flip: false" in capsys.readouterr().err
    assert main(["eval", str(digits_run), "--tta", "hflip,crops"]) == 2
    assert "data.horizontal_flip: false" in capsys.readouterr().err
    assert main(["eval", str(digits_run), "--tta", "crops", "--json"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values["validation/digit/count"] > 0 and 0 <= values["validation/digit/accuracy"] <= 1


def test_calibrate_fits_the_views_predict_uses(digits_run, workdir, monkeypatch, capsys):
    """The recipe's data.tta is [crops]: calibrate fits on crop-averaged logits by default, so
    the ECE that eval then reports (with its default views) is the one calibrate promised."""
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    assert main(["calibrate", str(digits_run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    info = json.loads((digits_run / "model.json").read_text())
    assert info["calibration"]["views"] == ["crops"]
    assert info["temperatures"] == {n: r["temperature"] for n, r in report.items()}
    assert main(["eval", str(digits_run), "--json"]) == 0  # default views: the recipe's crops
    after = json.loads(capsys.readouterr().out)
    assert after["validation/digit/ece"] == pytest.approx(report["digit"]["ece_after"], abs=1e-6)
    assert main(["calibrate", str(digits_run), "--tta", "none", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["digit"]["ece_before"] != pytest.approx(report["digit"]["ece_before"], abs=1e-6)


def test_onnx_export_of_a_tta_run_says_its_predictions_are_single_view(digits_run, workdir):
    from transferkit.runs.export import export_run

    result = export_run(digits_run, "onnx", output=workdir / "calibration" / "digits.onnx")
    exported = transferkit.load(result.path)
    image = str(sorted((workdir / "data/digits/transfer/images").iterdir())[2])
    with pytest.warns(UserWarning, match="single-view"):
        next(exported.probabilities([image]))
    with warnings.catch_warnings():  # --tta none asks for one view: nothing to warn about
        warnings.simplefilter("error")
        next(exported.probabilities([image], tta=[]))
