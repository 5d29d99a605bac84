"""The Python API: `fine_tune` with recipes, sections and in-memory data; `Run.predict` inputs."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

import transferkit as tk
from transferkit.errors import UserError

FAST = {"epochs": 2, "batch_size": 8, "lr": 0.01}
DATA = {"image_size": 32, "augment": "none", "num_workers": 0}


def _digits(count: int = 40):
    """Real handwritten digits (0-2) as PIL images, with a class and a parity label."""
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=3)
    images = [
        PIL.Image.fromarray((digits.images[i] * 15).astype(np.uint8)).convert("RGB")
        for i in range(count)
    ]
    labels = [int(t) for t in digits.target[:count]]
    return images, labels


def _recipe() -> dict:
    return {
        "model": {"backbone": "timm:test_resnet"},
        "tasks": {"digit": {"kind": "multiclass"}, "even": {"kind": "binary"}},
    }


def test_fine_tune_on_a_dataset_dict_returns_history_best_and_final(tmp_path):
    images, labels = _digits()
    table = {"image": images, "digit": labels, "even": [int(v % 2 == 0) for v in labels]}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "digit": datasets.Value("int64"),
            "even": datasets.Value("int64"),
        }
    )
    full = datasets.Dataset.from_dict(table, features=features)
    data = datasets.DatasetDict(
        {"train": full.select(range(30)), "validation": full.select(range(30, 40))}
    )
    result = tk.fine_tune(
        _recipe(), data=data, output=tmp_path / "run", train=FAST, data_options=DATA
    )

    assert isinstance(result.history, pd.DataFrame) and list(result.history["epoch"]) == [0, 1]
    assert "lr/heads" in result.history.columns
    assert set(result.final) >= {"val/digit/accuracy", "val/even/accuracy"}
    best_epoch = result.run_dir.info().epoch
    row = result.history[result.history["epoch"] == best_epoch].iloc[0]
    assert result.best["val/digit/accuracy"] == pytest.approx(row["val/digit/accuracy"])
    assert result.best["val/digit/accuracy"] == pytest.approx(
        result.history["val/digit/accuracy"].max()
    )
    assert result.run_dir.is_complete()
    # Every validation row was the caller's: 10 of them.
    assert result.run_dir.final()["val/digit/count"] == 10
    # The data travels with the run: eval works from the folder alone.
    values = tk.evaluate_run(result.run_dir.path)
    assert values["validation/digit/count"] == 10


def test_fine_tune_on_image_label_pairs_with_a_shipped_recipe_and_overrides(tmp_path):
    images, labels = _digits(30)
    pairs = [(image, {"digit": label}) for image, label in zip(images, labels)]
    result = tk.fine_tune(
        "digits_source",
        pairs,
        output=tmp_path / "pairs",
        train=FAST,
        data_options={**DATA, "val_fraction": 0.3},
        overrides=["train.epochs=1"],
    )
    assert len(result.history) == 1  # the override wins over the section
    assert result.run_dir.recipe().data.val_fraction == 0.3
    assert result.run_dir.final()["val/digit/count"] == 9  # 30% of 30 carved for validation


def test_fine_tune_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="train.lr"):
        tk.fine_tune(_recipe(), [], output=tmp_path / "x", train={"lr": "fast"})
    with pytest.raises(UserError, match="list of"):
        tk.fine_tune(_recipe(), data=42, output=tmp_path / "y")
    with pytest.raises(UserError, match="unknown recipe key data.nope"):
        tk.fine_tune(_recipe(), data={"source": "disk", "path": "x", "nope": 1})
    with pytest.raises(UserError, match="shipped recipes"):
        tk.fine_tune("no_such_recipe", output=tmp_path / "z")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    images, labels = _digits(30)
    pairs = [(image, {"digit": label}) for image, label in zip(images, labels)]
    root = tmp_path_factory.mktemp("predict")
    return tk.fine_tune(_recipe() | {"tasks": {"digit": {"kind": "multiclass"}}}, pairs,
                        output=root / "run", train={**FAST, "epochs": 1}, data_options=DATA)  # fmt: skip


def test_predict_takes_paths_pil_images_and_tensors_in_batches(small_run, tmp_path):
    run = small_run.load()
    images, _ = _digits(5)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    tensors = torch.stack([run.transform(image) for image in images])
    by_path = run.predict([str(p) for p in paths], batch_size=2, device="cpu")
    by_pil = run.predict(images, batch_size=3)
    by_tensor = run.predict(tensors)
    by_folder = run.predict(tmp_path)
    assert len(by_path) == 5
    assert _unnamed(by_path) == _unnamed(by_pil) == _unnamed(by_tensor) == _unnamed(by_folder)
    # Every result says which input it is: the file's path, or its place among the inputs.
    assert [row["image"] for row in by_folder] == [str(p) for p in sorted(paths)]
    assert [row["image"] for row in by_pil] == [f"input[{i}]" for i in range(5)]
    assert [row["image"] for row in by_tensor] == [f"input[0][{i}]" for i in range(5)]
    assert run.predict_named(str(tmp_path)) == by_folder  # its earlier name


def _unnamed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "image"} for row in rows]


def test_predict_decodes_like_training_exif_orientation_included(small_run, tmp_path):
    """A photo stored sideways with an EXIF rotation: training sees it upright (datasets and
    `open_image` apply EXIF), so predicting from a path or an opened PIL image must too."""
    run = small_run.load()
    upright = PIL.Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (48, 24, 3), dtype=np.uint8)
    )
    stored = upright.transpose(PIL.Image.Transpose.ROTATE_90)  # EXIF 6 undoes this on load
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6
    path = tmp_path / "sideways.png"
    stored.save(path, exif=exif)
    expected = _unnamed(run.predict([upright]))
    assert _unnamed(run.predict([str(path)])) == expected
    assert _unnamed(run.predict([PIL.Image.open(path)])) == expected
    probabilities = [p for _, p in run.probabilities([PIL.Image.open(path), stored])]
    sideways = probabilities[0]["digit"]
    assert not torch.allclose(sideways[0], sideways[1])  # orientation does change the output


def test_predict_bad_inputs_are_clear_errors(small_run, tmp_path):
    run = small_run.load()
    with pytest.raises(UserError, match="no such image file"):
        run.predict([str(tmp_path / "missing.png")])
    with pytest.raises(UserError, match=r"\[3, H, W\]"):
        run.predict([torch.zeros(1, 8, 8)])
    with pytest.raises(UserError, match="cannot predict on a int"):
        run.predict([3])
    with pytest.raises(UserError, match="no CUDA GPU"):
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU: the error cannot happen")
        run.predict([torch.zeros(3, 32, 32)], device="cuda")
