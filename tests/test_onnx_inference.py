"""Inference without torch: NumPy preprocessing equal to the torch eval transform, an exported
ONNX model predicting in a process where torch cannot be imported, and batch prediction to
CSV and Parquet tables that resume after an interruption."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
from conftest import ROOT

import transferkit
from transferkit.cli import main
from transferkit.core.image_files import open_image
from transferkit.core.preprocess import Preprocessing
from transferkit.core.task_spec import TaskSpec
from transferkit.data import build_transforms
from transferkit.errors import UserError
from transferkit.inference.table import write_predictions
from transferkit.models import DataConfig
from transferkit.runs.export import export_run


def _test_images(workdir) -> list[PIL.Image.Image]:
    """Real digits, and photos-like images of other sizes, aspect ratios and modes."""
    digits = sorted((workdir / "data/digits/transfer/images").iterdir())[:3]
    images = [open_image(p) for p in digits]
    rng = np.random.default_rng(0)
    for w, h in ((64, 48), (37, 90), (20, 20), (300, 199)):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images.append(PIL.Image.fromarray(pixels).filter(PIL.ImageFilter.SMOOTH))
    return images


@pytest.mark.parametrize(
    "config, image_size",
    [
        (DataConfig(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.95), 32),
        (DataConfig(), None),  # ImageNet defaults: 224 px, crop_pct 0.875, bilinear
        (DataConfig(interpolation="bicubic", crop_pct=1.0), 48),
        (DataConfig(crop_mode="squash", interpolation="lanczos"), 40),
        (DataConfig(crop_pct=1.2, interpolation="random"), 30),  # resize below the crop: padding
    ],
)
def test_numpy_preprocessing_matches_the_torch_eval_transform(config, image_size, workdir):
    torch_transform = build_transforms(config, train=False, augment="none", image_size=image_size)
    numpy_transform = Preprocessing.from_dict(
        Preprocessing.from_config(config, image_size).to_dict()  # as stored in the file
    )
    for image in _test_images(workdir):
        want = torch_transform(image).numpy()
        got = numpy_transform(image)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-5


@pytest.fixture(scope="module")
def onnx_model(multitask_run, workdir):
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        output = workdir / "onnx_inference" / "model.onnx"
        return export_run(multitask_run, "onnx", output=output, dynamic_batch=True).path
    finally:
        os.chdir(cwd)


BLOCK_TORCH = """
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")

sys.meta_path.insert(0, BlockTorch())
"""


def test_onnx_model_predicts_in_a_process_without_torch(
    onnx_model, multitask_run, workdir, tmp_path
):
    images = workdir / "data/digits/transfer/images"
    files = sorted(images.iterdir())[:6]
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import json
        import transferkit
        from transferkit.cli import main

        run = transferkit.load({str(onnx_model)!r})
        results = run.predict_named({[str(f) for f in files]!r}, batch_size=4)
        assert main(["predict", {str(onnx_model)!r}, {str(images)!r}, "--tta", "none",
                     "--output", {str(tmp_path / "table.csv")!r}, "--no-progress"]) == 0
        assert main(["predict", {str(onnx_model)!r}, {str(files[0])!r}, "--tta", "crops"]) == 2
        print(json.dumps({{"results": results, "torch": "torch" in sys.modules}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["torch"] is False
    reference = transferkit.load(multitask_run).predict_named(files)
    for got, want in zip(found["results"], reference):
        assert got["image"] == want["image"]
        assert got["digit"]["label"] == want["digit"]["label"]
        assert got["parity"]["label"] == want["parity"]["label"]
        assert got["ink"]["value"] == pytest.approx(want["ink"]["value"], abs=2e-4)
    with (tmp_path / "table.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list(images.iterdir()))


class _Interrupted:
    """A run that stops after its first batch, as a killed process would."""

    def __init__(self, run) -> None:
        self.run, self.tasks = run, run.tasks

    def probabilities(self, inputs, device=None, batch_size=64, tta=None, skipped=None):
        for i, batch in enumerate(self.run.probabilities(inputs, device, batch_size, tta, skipped)):
            if i == 1:
                raise KeyboardInterrupt
            yield batch


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_prediction_table_resumes_after_an_interruption(
    suffix, onnx_model, workdir, tmp_path, monkeypatch
):
    import pandas as pd

    monkeypatch.chdir(tmp_path)

    run = transferkit.load(onnx_model)
    folder = tmp_path / "images"
    folder.mkdir()
    for file in sorted((workdir / "data/digits/transfer/images").iterdir())[:25]:
        (folder / file.name).write_bytes(file.read_bytes())
    complete = tmp_path / f"complete{suffix}"
    write_predictions(run, folder, complete, batch_size=10, progress=False)
    table = tmp_path / f"table{suffix}"
    with pytest.raises(KeyboardInterrupt):
        write_predictions(_Interrupted(run), [folder], table, batch_size=10, progress=False)
    if suffix == ".csv":
        with table.open("a") as handle:
            handle.write(f"{folder}/torn.png,5,0.9")  # a row cut off mid-write
    else:
        assert (tmp_path / "table.parquet.parts" / "part-000000.parquet").is_file()
    with pytest.raises(UserError, match="--resume"):
        write_predictions(run, folder, table, progress=False)
    # Resumed from another directory with a relative path: the rows written are found.
    monkeypatch.chdir(folder.parent)
    summary = write_predictions(run, "images", table, resume=True, batch_size=10, progress=False)
    assert (summary.already, summary.written) == (10, 15)

    read = pd.read_csv if suffix == ".csv" else pd.read_parquet
    got, want = read(table), read(complete)
    columns = ["image", "digit", "digit_score", "parity", "parity_score", "ink", "error"]
    assert list(got.columns) == columns and len(got) == 25 and got["image"].is_unique
    assert got["error"].isna().all()
    pd.testing.assert_frame_equal(got.sort_values("image", ignore_index=True), want)
    assert set(got["parity"]) <= {"even", "odd"}
    assert not (tmp_path / "table.parquet.parts").exists()


def test_predict_to_a_table_from_a_run_folder_with_a_progress_bar(
    multitask_run, workdir, tmp_path, capsys
):
    images = workdir / "data/digits/transfer/images"
    output = tmp_path / "predictions.csv"
    assert main(["predict", str(multitask_run), str(images), "--output", str(output)]) == 0
    captured = capsys.readouterr()
    count = len(list(images.iterdir()))
    assert f"wrote {count} rows to {output}" in captured.out
    assert f"{count}/{count}" in captured.err and "img" in captured.err  # tqdm's bar
    assert main(["predict", str(multitask_run), str(images), "--output", str(output)]) == 2
    assert "--resume" in capsys.readouterr().err
    args = ["predict", str(multitask_run), str(images), "--output", str(output), "--resume"]
    assert main(args) == 0
    assert f"wrote 0 rows to {output} ({count} were already there)" in capsys.readouterr().out
    assert (
        main(["predict", str(multitask_run), str(images), "--output", str(tmp_path / "x.txt")]) == 2
    )
    assert "must end in .csv or .parquet" in capsys.readouterr().err


def test_resuming_with_another_model_is_refused(source_run, workdir, tmp_path):
    images = sorted((workdir / "data/digits/transfer/images").iterdir())[:3]
    table = tmp_path / "t.csv"
    table.write_text("image,colour,colour_score\n")
    with pytest.raises(UserError, match="has columns"):
        write_predictions(transferkit.load(source_run), images, table, resume=True)


def test_a_calibrated_run_keeps_its_temperatures_through_onnx(multitask_run, tmp_path):
    import shutil

    from transferkit.rundir import RunDir

    folder = tmp_path / "calibrated"
    shutil.copytree(multitask_run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    RunDir(folder).update_info(temperatures={"digit": 2.5, "parity": 0.5})
    pictures = multitask_run.parent.parent / "data/digits/transfer/images"
    exported = export_run(folder, "onnx", dynamic_batch=True, images=pictures)
    images = sorted(pictures.iterdir())[:5]
    run, onnx_run = transferkit.load(folder), transferkit.load(exported.path)
    uncalibrated = transferkit.load(multitask_run)
    for want, got, raw in zip(
        run.predict(images), onnx_run.predict(images), uncalibrated.predict(images)
    ):
        for task in ("digit", "parity"):
            assert got[task]["label"] == want[task]["label"]
            assert abs(got[task]["score"] - want[task]["score"]) < 1e-4
        assert abs(want["digit"]["score"] - raw["digit"]["score"]) > 1e-3  # it was applied


@pytest.mark.parametrize(
    "task, probabilities, columns, cells",
    [
        (TaskSpec("tags", "multilabel", 3, class_names=("cat", "dog", "sky")), [0.9, 0.2, 0.7],
         ["tags", "tags_score_cat", "tags_score_dog", "tags_score_sky"], ["cat;sky", 0.9, 0.2, 0.7]),
        (TaskSpec("box", "regression", 2), [0.25, -1.5], ["box_0", "box_1"], [0.25, -1.5]),
        (TaskSpec("ink", "regression", 1), [0.5], ["ink"], [0.5]),
        (TaskSpec("even", "binary", class_names=("even", "odd")), 0.2, ["even", "even_score"], ["even", 0.8]),
    ],
)  # fmt: skip
def test_prediction_table_columns_for_every_task_kind(task, probabilities, columns, cells):
    from transferkit.inference.predictions import describe_prediction, table_columns, table_row

    described = describe_prediction(task, np.asarray(probabilities, dtype=np.float32))
    assert table_columns(task) == columns
    row = table_row(task, described)
    assert len(row) == len(columns)
    for got, want in zip(row, cells):
        assert got == (want if isinstance(want, str) else pytest.approx(want, abs=1e-4))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_unreadable_images_are_listed_in_the_table_or_stop_it(
    suffix, onnx_model, workdir, tmp_path
):
    import pandas as pd

    run = transferkit.load(onnx_model)
    folder = tmp_path / "images"
    folder.mkdir()
    for file in sorted((workdir / "data/digits/transfer/images").iterdir())[:6]:
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "broken.png").write_bytes(b"not a picture")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        write_predictions(run, folder, tmp_path / f"stopped{suffix}", progress=False)
    table = tmp_path / f"skipped{suffix}"
    summary = write_predictions(run, folder, table, progress=False, bad_images="skip")
    assert [name for name, _ in summary.skipped] == [str(folder / "broken.png")]
    got = (pd.read_csv if suffix == ".csv" else pd.read_parquet)(table)
    assert len(got) == 7 and got["error"].notna().sum() == 1
    broken = got[got["image"] == str(folder / "broken.png")].iloc[0]
    assert "cannot identify image file" in broken["error"] and pd.isna(broken["digit"])


def test_a_table_begun_before_the_error_column_resumes_as_it_was(onnx_model, workdir, tmp_path):
    import pandas as pd

    run = transferkit.load(onnx_model)
    folder = tmp_path / "images"
    folder.mkdir()
    for file in sorted((workdir / "data/digits/transfer/images").iterdir())[:4]:
        (folder / file.name).write_bytes(file.read_bytes())
    table = tmp_path / "old.csv"
    write_predictions(run, folder, table, progress=False)
    old = pd.read_csv(table).drop(columns="error").iloc[:2]  # as an older version wrote it
    old.to_csv(table, index=False)
    summary = write_predictions(run, folder, table, resume=True, progress=False)
    assert (summary.already, summary.written) == (2, 2)
    assert "error" not in pd.read_csv(table).columns and len(pd.read_csv(table)) == 4
