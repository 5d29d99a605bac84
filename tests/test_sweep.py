"""`transferkit sweep`: grids, resumable runs, shared folders, and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from transferkit.errors import UserError
from transferkit.select.grid_sweep import _claim, combinations, parse_grid, run_name, sweep

FIXED = [
    "model.weights=none",
    "data.max_samples=32",
    "train.epochs=1",
    "train.batch_size=16",
    "data.num_workers=0",
]
GRID = ["schedule.phases.1.freeze=all,none", "train.lr=0.003,0.0003"]
RECIPE = str(ROOT / "recipes/digits_transfer.yaml")


def test_grid_parsing():
    grid = parse_grid(
        [
            "train.lr=0.1,0.01",
            'schedule.phases.0.freeze=["train:layer3,layer4", all]',
            "train.compile=false",
        ]
    )
    assert grid == {
        "train.lr": [0.1, 0.01],
        "schedule.phases.0.freeze": ["train:layer3,layer4", "all"],
        "train.compile": [False],
    }
    assert len(combinations(grid)) == 4
    assert run_name(3, {"schedule.phases.1.freeze": "up_to:layer2"}) == "003_freeze=up_to-layer2"
    for bad in ["train.lr", "=1,2", "train.lr=", "x=[1,"]:
        with pytest.raises(UserError, match="--grid"):
            parse_grid([bad])


def test_bad_combination_fails_before_any_training(tmp_path):
    with pytest.raises(UserError, match="train.lr"):
        sweep(RECIPE, parse_grid(["train.lr=0.1,fast"]), str(tmp_path / "bad"), FIXED)
    assert not list((tmp_path / "bad").glob("0*"))


def _trainings(root: Path) -> dict[str, int]:
    return {p.parent.name: p.read_text().count("run folder:") for p in root.glob("*/train.log")}


@pytest.mark.slow
def test_two_processes_share_a_sweep_and_each_run_trains_once(workdir, monkeypatch):
    root = workdir / "shared_sweep"
    cmd = [sys.executable, "-m", "transferkit.cli", "sweep", RECIPE, "--output", str(root)]
    for item in FIXED:
        cmd += ["--set", item]
    for item in GRID:
        cmd += ["--grid", item]
    processes = [
        subprocess.Popen(
            cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read()[-2000:]
    assert _trainings(root) == {
        run_name(i, c): 1 for i, c in enumerate(combinations(parse_grid(GRID)))
    }
    # The report: a table with each task's metric, size, speed and memory, a CSV and plots.
    report = (root / "report.md").read_text()
    assert (
        "4 runs done" in report and "val/digit/accuracy" in report and "trainable_params" in report
    )
    rows = (root / "report.csv").read_text().splitlines()
    assert len(rows) == 5 and "peak_memory_mb" in rows[0] and "s_per_epoch" in rows[0]
    assert (root / "report_val_digit_accuracy.png").stat().st_size > 1000
    # Run again: everything is finished, nothing is trained twice.
    monkeypatch.chdir(workdir)
    sweep(RECIPE, parse_grid(GRID), str(root), FIXED)
    assert set(_trainings(root).values()) == {1}


def test_claims_of_live_and_dead_processes(tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    (live / "claim.json").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid()}))
    assert not _claim(live)  # its owner is alive: leave it
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "claim.json").write_text(
        json.dumps({"host": os.uname().nodename, "pid": 2**22 + 12345})
    )
    assert _claim(dead)  # its owner died: take it over
    assert json.loads((dead / "claim.json").read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_the_runs_of_a_probe_sweep_share_the_feature_cache(workdir, tmp_path, monkeypatch):
    """Each run is its own process; the first computes the backbone features into the shared
    cache, the others read them (their logs say which)."""
    monkeypatch.chdir(workdir)
    fixed = [*FIXED, f"train.feature_cache_dir={tmp_path / 'cache'}"]
    grid = parse_grid(["train.lr=0.01,0.001,0.0001"])
    root = tmp_path / "probe_sweep"
    sweep(RECIPE, grid, str(root), fixed)
    logs = [(root / run_name(i, c) / "train.log").read_text() for i, c in
            enumerate(combinations(grid))]  # fmt: skip
    assert "features: computed once into the shared cache" in logs[0]
    assert all("features: read from the shared cache" in log for log in logs[1:])
