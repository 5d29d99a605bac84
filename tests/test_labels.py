"""Classes found in the data are checked before a head is built on them (typos, case, rare
classes), and a multi-label cell can say "none of these labels" apart from "missing"."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from transferkit.data import DataSection, TaskSection, load_data
from transferkit.errors import UserError


def _manifest(tmp_path, column: str, values: list[str]):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", column])
        writer.writerows([["a.png", v] for v in values])
    return DataSection(source="manifest", path=str(path), val_split=None)


def _load(data, **task):
    return load_data(data, {"shape": TaskSection(**task)}, seed=0, carve_validation=False)


SHAPES = ["circle"] * 6 + ["square"] * 6


@pytest.mark.parametrize(
    "typo, said",
    [("circel", "'circel' (1) and 'circle' (6) differ only by one small edit"),
     ("Circle", "'Circle' (1) and 'circle' (6) differ only by case or spacing"),
     ("square ", None),  # trailing space: cleaned, the same class
     ("squares", "'square' (6) and 'squares' (1) differ only by one small edit")],
)  # fmt: skip
def test_classes_that_look_like_typos_are_one_error_naming_them(tmp_path, typo, said):
    data = _manifest(tmp_path, "shape", [*SHAPES, typo])
    if said is None:
        assert _load(data, kind="multiclass").tasks[0].class_names == ("circle", "square")
        return
    with pytest.raises(UserError, match="look like typos") as error:
        _load(data, kind="multiclass")
    assert said in str(error.value) and "tasks.shape.classes" in str(error.value)
    # declared classes are taken as they are
    declared = sorted({*SHAPES, typo})
    assert _load(data, kind="multiclass", classes=declared).tasks[0].num_outputs == 3


def test_a_class_with_too_few_examples_is_an_error_unless_accepted(tmp_path):
    data = _manifest(tmp_path, "shape", [*SHAPES, "triangle"])
    with pytest.raises(UserError) as error:
        _load(data, kind="multiclass")
    assert "fewer than 2 labelled examples: 'triangle' (1)" in str(error.value)
    assert "tasks.shape.min_examples: 1" in str(error.value)
    assert _load(data, kind="multiclass", min_examples=1).tasks[0].num_outputs == 3
    with pytest.raises(UserError, match="fewer than 7 labelled examples: 'circle' \\(6\\)"):
        _load(data, kind="multiclass", min_examples=7)


def test_names_that_differ_in_digits_are_separate_classes(tmp_path):
    data = _manifest(tmp_path, "shape", ["class_1"] * 3 + ["class_2"] * 3 + ["type10"] * 3)
    assert _load(data, kind="multiclass").tasks[0].num_outputs == 3


def test_a_multilabel_cell_says_none_of_these_apart_from_missing(tmp_path):
    cells = ["red|round"] * 3 + ["round"] * 3 + ["-", "[]", ""]
    loaded = _load(_manifest(tmp_path, "shape", cells), kind="multilabel")
    assert loaded.tasks[0].class_names == ("red", "round")
    rows = loaded.splits["train"]["shape"][:]
    assert rows[6] == [0.0, 0.0] and rows[7] == [0.0, 0.0]  # labelled: neither
    assert all(math.isnan(v) for v in rows[8])  # blank: missing
