"""`transferkit lr-find`: the valley rule, a range test on a phase of the digits recipe, the
plot, and no run state left behind."""

from __future__ import annotations

import math

import pytest
from conftest import QUICK, ROOT

from transferkit.cli import main
from transferkit.errors import UserError
from transferkit.recipes import load_recipe
from transferkit.select.lr_range_test import range_test, valley


def test_valley_picks_the_steep_part_of_the_longest_descent():
    lrs = [10 ** (-6 + i * 0.1) for i in range(60)]
    # Flat, then a long descent from index 10 to 40, then divergence.
    losses = [2.0] * 10 + [2.0 - 0.05 * i for i in range(30)] + [0.6 + 0.3 * i for i in range(20)]
    suggestion = lrs.index(valley(lrs, losses))
    assert 14 <= suggestion <= 30  # inside the descent, before its bottom (index 39)
    with pytest.raises(UserError, match="too few steps"):
        valley(lrs[:2], losses[:2])


def test_range_test_on_the_fine_tune_phase(workdir, source_run, monkeypatch):
    monkeypatch.chdir(workdir)
    weights = f"model.weights={source_run / 'model.safetensors'}"
    recipe = load_recipe(ROOT / "recipes/digits_transfer.yaml", [*QUICK, weights])
    probe = range_test(recipe, phase=0, steps=30, min_lr=1e-5, max_lr=10.0)
    tune = range_test(recipe, phase=1, steps=30, min_lr=1e-5, max_lr=10.0)
    for result in (probe, tune):
        assert result.lrs[0] == pytest.approx(1e-5) and result.lrs == sorted(result.lrs)
        assert all(math.isfinite(v) for v in result.losses)
        assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    assert (probe.phase, tune.phase) == (0, 1)
    # A learning rate of 10 diverges on these tasks: the test stops early or the loss climbs.
    assert len(tune.lrs) < 30 or tune.losses[-1] > min(tune.losses)


def test_cli_writes_the_plot_and_leaves_no_run_folder(workdir, source_run, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    before = sorted(p.name for p in (workdir / "runs").iterdir())
    plot = workdir / "lr.png"
    args = ["lr-find", str(ROOT / "recipes/digits_source.yaml"), "--steps", "20", "--output",
            str(plot), *[item for q in QUICK for item in ("--set", q)]]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "suggested train.lr" in out and "--set train.lr=" in out
    assert plot.stat().st_size > 5000
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == before
    assert main(["lr-find", str(ROOT / "recipes/digits_source.yaml"), "--phase", "3"]) == 2
