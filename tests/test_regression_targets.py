"""Regression targets in their own units: learned standardized by the training split's mean and
sd, answered in the column's units (metrics, predictions, exports), `standardize: false` to
opt out. Runs saved before the key existed resume as they were (tests/test_legacy_run.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from transferkit.cli import main
from transferkit.data import DataSection, TaskSection, load_data
from transferkit.engine import multitask_loss
from transferkit.models import MultiTaskModel, TaskSpec, create_backbone
from transferkit.rundir import RunDir

SIZE_SCALE, SIZE_SHIFT = 40.0, 300.0  # a "size in pixels": mean about 300, sd about 10


@pytest.fixture(scope="module")
def sized_digits(tmp_path_factory):
    """Digits 0-2 with a class and a size column in pixel units (a few sizes left blank)."""
    root = tmp_path_factory.mktemp("sized")
    digits = load_digits(n_class=3)
    (root / "images").mkdir()
    rows = []
    for i in range(90):
        pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32)).save(root / f"images/{i}.png")
        size = SIZE_SHIFT + SIZE_SCALE * digits.images[i].mean() / 16
        rows.append({"image": f"images/{i}.png", "split": "validation" if i % 3 == 0 else "train",
                     "digit": str(digits.target[i]), "size": "" if i % 7 == 0 else f"{size:.3f}"})  # fmt: skip
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _tasks(**size) -> dict[str, TaskSection]:
    return {"digit": TaskSection(kind="multiclass"), "size": TaskSection(kind="regression", **size)}


def _load(root, **size):
    data = DataSection(source="manifest", path=str(root / "manifest.csv"))
    return load_data(data, _tasks(**size), seed=0)


def test_a_regression_target_is_standardized_by_the_training_split(sized_digits):
    loaded = _load(sized_digits)
    spec = next(t for t in loaded.tasks if t.name == "size")
    train = np.array(loaded.splits["train"]["size"][:], dtype=float)
    train = train[~np.isnan(train)]
    assert spec.target_mean == pytest.approx((train.mean(),))
    assert spec.target_std == pytest.approx((train.std(),))
    val = np.array(loaded.splits["validation"]["size"][:], dtype=float)
    assert spec.target_mean != pytest.approx((val[~np.isnan(val)].mean(),))  # train only
    digit = next(t for t in loaded.tasks if t.name == "digit")
    assert digit.target_mean is None and "target_mean" not in digit.to_dict()


def test_standardize_false_keeps_the_raw_units(sized_digits):
    spec = next(t for t in _load(sized_digits, standardize=False).tasks if t.name == "size")
    assert spec.target_mean is None and spec.target_std is None


def test_a_standardized_head_answers_in_units_and_its_loss_is_in_standard_units():
    torch.manual_seed(0)
    spec = TaskSpec("size", "regression", 2, target_mean=(300.0, -5.0), target_std=(10.0, 0.5))
    model = MultiTaskModel(create_backbone("timm:test_resnet"), [spec])
    features = torch.randn(4, model.backbone.num_features)
    raw = model.heads["size"].net(features)
    out = model(features=features)["size"]
    assert torch.allclose(out, raw * torch.tensor([10.0, 0.5]) + torch.tensor([300.0, -5.0]))
    assert "heads.size.target_mean" not in model.state_dict()  # rebuilt from the spec
    target = torch.tensor([[310.0, -5.5]] * 4)
    mask = torch.ones(4, dtype=torch.bool)
    _, losses = multitask_loss({"size": out}, {"size": target}, {"size": mask}, {"size": spec}, {})
    standard = F.mse_loss((out - torch.tensor([300.0, -5.0])) / torch.tensor([10.0, 0.5]),
                          (target - torch.tensor([300.0, -5.0])) / torch.tensor([10.0, 0.5]))  # fmt: skip
    assert losses["size"].item() == pytest.approx(standard.item(), rel=1e-5)


def test_a_run_learns_standardized_and_reports_in_the_columns_units(
    sized_digits, monkeypatch, capsys
):
    monkeypatch.chdir(sized_digits)
    recipe = sized_digits / "recipe.yaml"
    recipe.write_text(
        "model: {backbone: 'timm:test_resnet'}\n"
        "tasks: {digit: {kind: multiclass}, size: {kind: regression}}\n"
        "data: {source: manifest, path: manifest.csv, image_size: 32, augment: none,"
        " num_workers: 0}\n"
        "train: {epochs: 2, batch_size: 16, lr: 0.01, feature_cache: forbid}\n"
    )
    assert main(["train", str(recipe), "--output", "run"]) == 0
    info = RunDir("run").info()
    spec = info.task_specs["size"]
    assert spec.target_mean[0] == pytest.approx(SIZE_SHIFT + SIZE_SCALE * 0.3, abs=SIZE_SCALE / 4)
    capsys.readouterr()
    assert main(["predict", "run", "images", "--json"]) == 0
    predicted = {Path(row["image"]).name: row["size"]["value"]
                 for row in json.loads(capsys.readouterr().out)}  # fmt: skip
    with (sized_digits / "manifest.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "validation" and r["size"]]
    errors = [abs(predicted[Path(r["image"]).name] - float(r["size"])) for r in rows]
    # In the column's units: near the targets (a raw-unit head starts near 0, 300 away).
    assert max(errors) < 3 * spec.target_std[0]
    assert main(["eval", "run", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["validation/size/mae"] == pytest.approx(np.mean(errors), rel=1e-3, abs=1e-3)
