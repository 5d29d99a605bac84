"""Every PIL image mode decodes to the right RGB, the same way in training, `predict` and the
ONNX path: 16- and 32-bit integer and float grayscale scaled by their real range (PIL's own
conversion clips them, so a 16-bit scan came out white), palette and alpha as before."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import transferkit
from transferkit.core import open_image

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"
GRADIENT = np.tile(np.arange(0, 256, 5, dtype=np.uint8), (8, 1))  # 8 x 52, 0 to 255


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


CASES = {
    "16-bit PNG (I;16)": (GRADIENT.astype(np.uint16) * 257, "PNG", "I;16"),
    "32-bit integers in 0-255": (GRADIENT.astype(np.int32), "TIFF", "I"),
    "32-bit integers in 0-65535": (GRADIENT.astype(np.int32) * 257, "TIFF", "I"),
    "32-bit integers, other range": (GRADIENT.astype(np.int32) * 1000 - 7000, "TIFF", "I"),
    "float in 0-1": (GRADIENT.astype(np.float32) / 255, "TIFF", "F"),
    "float in 0-255": (GRADIENT.astype(np.float32), "TIFF", "F"),
    "float, other range": (GRADIENT.astype(np.float32) / 25.5 - 3, "TIFF", "F"),
}


@pytest.mark.parametrize("case", CASES)
def test_high_depth_grayscale_decodes_to_the_8_bit_image(case):
    array, fmt, mode = CASES[case]
    data = _encoded(array, fmt)
    assert PIL.Image.open(io.BytesIO(data)).mode == mode
    decoded = np.asarray(open_image(data), dtype=np.int16)
    assert decoded.shape == (*GRADIENT.shape, 3)
    for channel in range(3):
        assert np.abs(decoded[..., channel] - GRADIENT).max() <= 1, case


def test_palette_alpha_and_colour_modes_decode_as_before():
    rgb = np.stack([GRADIENT, 255 - GRADIENT, np.full_like(GRADIENT, 7)], axis=-1)
    rgba = PIL.Image.fromarray(rgb).convert("RGBA")
    assert np.array_equal(np.asarray(open_image(rgba)), rgb)  # alpha dropped
    gray_alpha = PIL.Image.fromarray(GRADIENT).convert("LA")
    assert np.array_equal(np.asarray(open_image(gray_alpha))[..., 0], GRADIENT)
    palette = PIL.Image.fromarray(rgb).convert("P", palette=PIL.Image.Palette.ADAPTIVE)
    assert np.array_equal(np.asarray(open_image(palette)), np.asarray(palette.convert("RGB")))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A digit of the legacy run's data as an 8-bit PNG and as the same picture in 16 bits."""
    folder = tmp_path_factory.mktemp("modes")
    eight = np.asarray(PIL.Image.open(FIXTURE / "data/images/01.png").convert("L"))
    PIL.Image.fromarray(eight).save(folder / "eight.png")
    PIL.Image.fromarray(eight.astype(np.uint16) * 257).save(folder / "sixteen.png")
    return folder / "eight.png", folder / "sixteen.png"


def test_training_predict_and_onnx_see_a_16_bit_image_as_its_8_bit_twin(pair, tmp_path):
    from transferkit.data import TaskImageDataset
    from transferkit.runs import export_run

    eight, sixteen = pair
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    run = transferkit.load(run_dir)
    # training: the dataset decodes the files as the loader does
    import datasets

    table = datasets.Dataset.from_dict({"image": [str(eight), str(sixteen)],
                                        "digit": [0, 0]}).cast_column("image", datasets.Image())  # fmt: skip
    spec = run.tasks["digit"]
    dataset = TaskImageDataset(table, [spec], run.transform)
    assert torch.equal(dataset[0]["image"], dataset[1]["image"])
    # predict, torch and ONNX
    torch_rows = run.predict([eight, sixteen], device="cpu")
    assert torch_rows[0]["digit"] == torch_rows[1]["digit"]
    exported = export_run(run_dir, "onnx", images=eight.parent)
    onnx_rows = transferkit.load(exported.path).predict([eight, sixteen])
    assert onnx_rows[0]["digit"] == onnx_rows[1]["digit"]
    assert onnx_rows[1]["digit"]["label"] == torch_rows[1]["digit"]["label"]
