"""`transferkit fit DATA`: tasks typed from a folder or a table, the plan printed and written
as plan.yaml, the run it describes, and `train plan.yaml` training the same run again."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml
from conftest import records

from transferkit.cli import main
from transferkit.errors import UserError
from transferkit.recipes import load_recipe
from transferkit.select import make_plan

TINY = ["--set", "model.backbone=timm:test_efficientnet", "--set", "model.weights=none",
        "--set", "train.epochs=2", "--set", "data.num_workers=0", "--set", "data.image_size=32"]  # fmt: skip


@pytest.fixture(scope="module")
def class_folders(workdir, tmp_path_factory):
    """Three digit classes, 12 images each, one folder per class."""
    root = tmp_path_factory.mktemp("fit") / "digits"
    with (workdir / "data/digits/source/manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for digit in ("0", "1", "2"):
        (root / f"class_{digit}").mkdir(parents=True)
        for row in [r for r in rows if r["digit"] == digit][:12]:
            source = workdir / "data/digits/source" / row["image"]
            shutil.copy(source, root / f"class_{digit}" / source.name)
    return root


@pytest.fixture(scope="module")
def table(workdir, tmp_path_factory):
    """A table whose columns a user would have: a class, a yes/no, a quantity, tags, an id."""
    path = tmp_path_factory.mktemp("fit_table") / "labels.csv"
    with (workdir / "data/digits/source/manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:40]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "digit", "even", "ink", "tags", "id"])
        for i, row in enumerate(rows):
            digit = int(row["digit"])
            tags = ";".join(
                t for t, on in (("round", digit in (0, 6, 8, 9)), ("small", digit < 3)) if on
            )
            writer.writerow([str(workdir / "data/digits/source" / row["image"]), digit,
                             "yes" if digit % 2 == 0 else "no", f"{3.5 * digit + i / 100:.3f}",
                             tags or "-", f"row{i}"])  # fmt: skip
    return path


def test_a_table_s_columns_are_typed_by_their_values(table):
    with pytest.raises(UserError, match=r"column 'id' has 40 distinct texts .* --ignore id"):
        make_plan(table)
    plan = make_plan(table, ignore=("id",))
    kinds = {name: task["kind"] for name, task in plan.recipe["tasks"].items()}
    assert kinds == {"digit": "multiclass", "even": "binary", "ink": "regression",
                     "tags": "multilabel"}  # fmt: skip
    assert plan.recipe["data"]["image_column"] == "path"
    assert plan.recipe["data"]["image_size"] == 64  # 8 px scans: the smallest size
    assert any("task ink (regression): numbers from" in r for r in plan.reasons)
    # Several tasks: the kept model is the epoch with the best mean score over them.
    assert plan.recipe["train"]["monitor"] == "val/mean_score"
    assert any("the kept model: the epoch with the best mean" in r for r in plan.reasons)
    forced = make_plan(table, ignore=("id",), tasks={"digit": "regression"})
    assert forced.recipe["tasks"]["digit"]["kind"] == "regression"


def test_bad_data_is_one_error_naming_the_fix(class_folders, table, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in class sub-folders"):
        make_plan(tmp_path / "empty")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(b"")
    with pytest.raises(UserError, match="tar shards are streamed, which fit does not plan for"):
        make_plan(tmp_path / "shards")
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    shutil.copy(next((class_folders / "class_0").iterdir()), one / "a.png")
    with pytest.raises(UserError, match="only one class"):
        make_plan(tmp_path / "one")
    with pytest.raises(UserError, match="nothing.txt: no such file or folder"):
        make_plan(tmp_path / "nothing.txt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="give a folder of class folders .* save_to_disk"):
        make_plan(tmp_path / "notes.txt")
    with pytest.raises(UserError, match="--task digit=number: the kind must be one of"):
        make_plan(table, tasks={"digit": "number"})
    with pytest.raises(UserError, match="no column 'colour'"):
        make_plan(table, ignore=("colour",))
    for data in (class_folders, table):  # `train DATA` by mistake: the command that takes it
        with pytest.raises(UserError, match=rf"is data, not a recipe; `transferkit fit {data}`"):
            load_recipe(data)
    same = tmp_path / "same.csv"
    same.write_text(
        "image,kind\n" + "".join(f"{f},cat\n" for f in (class_folders / "class_0").iterdir())
    )
    with pytest.raises(UserError, match=r"column 'kind' has one value only .* --ignore kind"):
        make_plan(same)


def test_fit_plans_searches_trains_and_the_plan_trains_the_same_run_again(
    class_folders, tmp_path, monkeypatch, capsys
):
    """The issue's "done when": a class-folder dataset, a time budget, plan.yaml,
    fit_report.md, a model that predict and export use, and plan.yaml training the chosen run
    again with the same metrics."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "fitted"
    search = ["--time-budget", "5", "--max-trials", "4"]
    assert main(["fit", str(class_folders), "--output", str(out), "--dry-run", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "task label (multiclass): 3 class folders" in printed and "plan written to" in printed
    assert "search: probe, lp-ft, full and the learning rate, within 10 min" in printed
    assert (out / "plan.yaml").is_file() and not (out / "model.json").exists()
    assert yaml.safe_load((out / "plan.yaml").read_text())["train"]["monitor"] is None  # 1 task

    assert main(["fit", str(class_folders), "--output", str(out), *TINY, *search]) == 0
    printed = capsys.readouterr().out
    assert (out / "complete.json").is_file()
    trials = list(csv.DictReader((out / "fit_trials.csv").open()))
    assert [t["method"] for t in trials[:3]] == ["lp-ft", "probe", "full"]  # defaults first
    assert len(trials) == 4 and (out / "fit_report.png").is_file()
    report = (out / "fit_report.md").read_text()
    chosen = next(t for t in trials if f"| {t['trial']} **(chosen)**" in report)
    assert f"fit: chose trial {chosen['trial']} ({chosen['method']}" in printed
    winner = next((out / "trials").glob(f"{int(chosen['trial']):02d}_*/"))
    assert records(out) == records(winner)  # the run folder is the chosen trial's run
    assert float(chosen["score"]) == max(r["val/label/accuracy"] for r in records(out)
                                         if r["epoch"] == int(chosen["best_epoch"]))  # fmt: skip
    image = next((class_folders / "class_1").iterdir())
    assert main(["predict", str(out), str(image), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["label"]["label"] in {"class_0", "class_1", "class_2"}
    assert main(["export", str(out), "--format", "torchscript"]) == 0
    assert main(["train", str(out / "plan.yaml"), "--output", str(tmp_path / "again")]) == 0
    first, again = records(out), records(tmp_path / "again")
    assert [r["val/label/accuracy"] for r in again] == [r["val/label/accuracy"] for r in first]
    assert [r["train/loss"] for r in again] == [r["train/loss"] for r in first]
    capsys.readouterr()
    assert main(["fit", str(class_folders), "--output", str(out), *TINY, *search]) != 0
    assert "already holds a fit; choose another --output, or start afresh with --overwrite" in (
        capsys.readouterr().err
    )


def test_a_saved_dataset_s_features_are_taken_as_they_are(class_folders, tmp_path):
    import datasets

    files = sorted((class_folders / "class_0").iterdir())[:6]
    rows = {"img": [str(f) for f in files], "kind": [0, 1, 2, 0, 1, 2],
            "tags": [[0], [1], [0, 1], [], [1], [0]], "size": [0.5, 1.5, 2.0, 1.0, 0.2, 3.0],
            "yes": [0, 1, 0, 1, 0, 1], "note": [f"n{i}" for i in range(6)]}  # fmt: skip
    features = datasets.Features({
        "img": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b", "c"]),
        "tags": datasets.Sequence(datasets.ClassLabel(names=["x", "y"])),
        "size": datasets.Value("float32"), "yes": datasets.ClassLabel(names=["no", "yes"]),
        "note": datasets.Value("string")})  # fmt: skip
    dataset = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": dataset, "validation": dataset}).save_to_disk(tmp_path / "ds")
    with pytest.raises(UserError, match="column 'note' has 6 distinct texts .* --ignore note"):
        make_plan(tmp_path / "ds")
    plan = make_plan(tmp_path / "ds", ignore=("note",))
    kinds = {name: task["kind"] for name, task in plan.recipe["tasks"].items()}
    assert kinds == {"kind": "multiclass", "tags": "multilabel", "size": "regression",
                     "yes": "binary"}  # fmt: skip
    assert plan.recipe["data"] == {"source": "disk", "path": str(tmp_path / "ds"),
                                   "image_column": "img", "val_stratify": True,
                                   "val_split": "validation", "image_size": 64}  # fmt: skip
    assert any("a ClassLabel feature with 3 names" in r for r in plan.reasons)


def test_fit_takes_python_objects(class_folders, tmp_path, monkeypatch):
    """A list of (image, labels) pairs trains like a folder; a wrong item is one error."""
    from PIL import Image

    from transferkit.select import fit

    monkeypatch.chdir(tmp_path)
    pairs = [(Image.open(f).convert("RGB"), {"digit": c[-1], "odd": int(c[-1]) % 2})
             for c in ("class_0", "class_1", "class_2")
             for f in sorted((class_folders / c).iterdir())]  # fmt: skip
    result = fit(pairs, tmp_path / "objects", overrides=TINY[1::2], search_choices=False)
    kinds = {n: t["kind"] for n, t in result.plan.recipe["tasks"].items()}
    assert kinds == {"digit": "multiclass", "odd": "binary"}
    assert (tmp_path / "objects" / "complete.json").is_file()
    assert len(records(tmp_path / "objects")) == 2
    with pytest.raises(UserError, match="item 1 of the list is not an .image, labels. pair"):
        fit([pairs[0], pairs[1][0]], tmp_path / "bad", dry_run=True)
    with pytest.raises(UserError, match="DATA must be a path, a datasets.Dataset"):
        fit(42, tmp_path / "bad", dry_run=True)


def test_the_backbone_is_chosen_by_logme_among_the_candidates_that_load(class_folders, tmp_path):
    import yaml

    from transferkit.select import fit

    sets = ["data.image_size=32", "data.num_workers=0"]
    result = fit(class_folders, tmp_path / "ranked", dry_run=True, overrides=sets,
                 backbones=["timm:test_efficientnet@none", "timm:test_resnet@none",
                            "timm:resnet18"])  # fmt: skip
    (reason,) = [r for r in result.plan.reasons if r.startswith("backbone ")]
    assert "highest LogME" in reason and "timm:test_resnet@none" in reason
    assert "left out: timm:resnet18 (timm's pretrained weights for resnet18" in reason
    model = yaml.safe_load((tmp_path / "ranked" / "plan.yaml").read_text())["model"]
    assert model["backbone"] == reason.split()[1].rstrip(":") and model["weights"] == "none"
    with pytest.raises(UserError, match="--backbones timm:resnet18: no candidate's weights load"):
        fit(class_folders, tmp_path / "none", dry_run=True, overrides=sets,
            backbones=["timm:resnet18"])  # fmt: skip
