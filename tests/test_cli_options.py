"""Options a new user reached for: `train --device`, `eval --set` for the data's own column
names, and a shipped recipe run where its example data is not."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import QUICK

from transferkit.cli import main


def _sets(overrides: list[str]) -> list[str]:
    return [part for o in overrides for part in ("--set", o)]


def test_train_on_the_device_asked_for(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    args = ["train", "digits_source", *_sets([*QUICK, "train.epochs=1"])]
    assert main([*args, "--output", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "cpu" / "complete.json").read_text())
    assert summary["card"]["hardware"].startswith("1 x cpu")
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "bad"), "--device", "gpu0"]) == 2
    assert "--device gpu0: use auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_train_on_a_gpu_where_there_is_none_is_one_error(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert (
        main(["train", "digits_source", "--output", str(tmp_path / "x"), "--device", "cuda"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is available here; use cpu or auto" in err


def test_eval_reads_other_data_with_its_own_column_names(source_run, workdir, tmp_path, capsys):
    """The same images and labels under other column names: `--set` names them."""
    with (workdir / "data/digits/source/manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:30]
    other = tmp_path / "other.csv"
    with other.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "number"])
        writer.writerows(
            [[str(workdir / "data/digits/source" / r["image"]), r["digit"]] for r in rows]
        )
    args = ["eval", str(source_run), "--data", str(other), "--json"]
    assert (
        main([*args, "--set", "data.image_column=path", "--set", "tasks.digit.column=number"]) == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert (
        metrics["validation/digit/count"] == 30 and 0 <= metrics["validation/digit/accuracy"] <= 1
    )
    assert main([*args, "--set", "train.lr=1"]) == 2
    assert "only data keys apply" in capsys.readouterr().err


def test_a_shipped_recipe_without_its_example_data_says_how_to_write_it(tmp_path, monkeypatch,
                                                                         capsys):  # fmt: skip
    import transferkit as tk

    monkeypatch.chdir(tmp_path)
    assert main(["train", "digits_transfer"]) == 2
    err = capsys.readouterr().err
    assert "the shipped recipe digits_transfer reads data/digits/transfer/manifest.csv" in err
    assert "python -m transferkit.demo --data-only" in err and not (tmp_path / "runs").exists()
    with pytest.raises(tk.UserError, match="--data-only"):
        tk.fine_tune("digits_source")


def test_a_commands_first_imports_run_without_the_garbage_collector_then_are_frozen():
    """A fresh process imports torch and the rest with the collector off (collecting while a
    million lasting objects are made cost 0.9 s of start-up), then freezes them and turns the
    collector on again; where torch is already imported it changes nothing."""
    import gc
    import subprocess
    import sys

    from transferkit.cli.common import imports_without_gc

    code = ("import gc\nfrom transferkit.cli.common import imports_without_gc\n"
            "with imports_without_gc():\n    off = not gc.isenabled()\n    import torch\n"
            "print(off, gc.isenabled(), gc.get_freeze_count() > 10000)")  # fmt: skip
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.split() == ["True", "True", "True"]
    frozen = gc.get_freeze_count()
    with imports_without_gc():  # torch is imported in this process
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen


def test_commands_that_compute_metrics_import_torchmetrics_with_the_engine(monkeypatch):
    """The engine imports torchmetrics at first use (2-3 s); a command that computes metrics
    imports it up front with the rest, with the collector off, and one that computes none
    (its options can say so: `fit --dry-run`, `ensemble --predict`) does not import it."""
    import transferkit.cli as cli

    parser = cli._build_parser()
    imported = []
    monkeypatch.setattr("importlib.import_module", lambda name: imported.append(name))

    def preloaded(command: list[str]) -> bool:
        imported.clear()
        cli.preload(parser.parse_args(command).preload, parser.parse_args(command))
        assert "transferkit.engine" in imported, command
        return "torchmetrics" in imported

    for command in (["train", "r.yaml"], ["sweep", "r.yaml", "--grid", "train.lr=1"],
                    ["fit", "data/"], ["eval", "run/"], ["ensemble", "a/", "b/", "--eval"]):  # fmt: skip
        assert preloaded(command), command
    for command in (["lr-find", "r.yaml"], ["export", "run/"], ["rank", "r.yaml", "--backbones", "x"],
                    ["fit", "data/", "--dry-run"], ["ensemble", "a/", "b/", "--predict", "x.png"]):  # fmt: skip
        assert not preloaded(command), command
