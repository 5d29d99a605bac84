"""Feedback while work runs and when it ends: a progress line at most every half minute in a
log (a bar on a terminal), for training steps and for caching features; and a run's last
words: time taken, best epoch, last metrics, and curves.png in the folder."""

from __future__ import annotations

import io

from conftest import QUICK, ROOT

from transferkit.core import Progress
from transferkit.core import progress as progress_module
from transferkit.engine import train
from transferkit.recipes import load_recipe
from transferkit.rundir import RunDir


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_in_a_log_a_line_at_most_every_half_minute_with_rate_and_eta(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    log = io.StringIO()  # not a terminal
    progress = Progress(100, "epoch 3", "batch", stream=log)
    for _ in range(100):  # a batch every 2 s: 200 s in all
        clock.now += 2.0
        progress.update(1, loss="0.5000")
    progress.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 6  # at 30, 60, ..., 180 s
    assert lines[0] == "epoch 3: 15/100 batch, 0.5 batch/s, ETA 2:50, loss 0.5000"
    assert lines[-1].startswith("epoch 3: 90/100 batch") and "ETA 0:20" in lines[-1]


def test_a_run_in_a_log_shows_its_steps_and_feature_caching_then_sums_up(
    workdir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)  # every update, to see them here
    monkeypatch.chdir(workdir)
    # A cache of its own: another test's run of the same recipe would leave the features
    # stored in the session's shared cache, and this run would read them, not cache them.
    recipe = load_recipe(ROOT / "recipes/digits_transfer.yaml",
                         [*QUICK, "model.weights=none", "schedule.phases.1.from_epoch=1",
                          f"train.feature_cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    run = RunDir(train(recipe, output=str(tmp_path / "run")))
    out, err = capsys.readouterr()
    assert "caching features: " in err and "img/s" in err  # phase 0 is a probe
    assert "epoch 0: 1/" in err and "batch/s" in err and ", ETA " in err
    summary = run.summary()
    assert summary["seconds"] > 0
    ending = out.strip().splitlines()[-4:]
    assert ending[0].startswith(f"done in {round(summary['seconds'])} s: 2 epochs, ")
    assert ending[1] == (f"best: epoch {summary['best_epoch']}, {summary['monitor']} "
                         f"{summary['best']:.4f} (the saved model)")  # fmt: skip
    assert ending[2].startswith("last epoch (1): val/digit/accuracy ")
    assert ending[3] == f"run folder: {run.path} (curves: curves.png)"
    assert run.curves_path.stat().st_size > 10_000  # a drawn figure
