"""Training settings do what they say: accumulation, clipping, early stopping, mixed precision,
schedules, layer decay, metric choice, TensorBoard, eval on other data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUICK, ROOT, epoch_end_weights, records

from transferkit.cli import main
from transferkit.engine import train
from transferkit.engine.optim import schedule_factor
from transferkit.errors import UserError
from transferkit.recipes import load_recipe

SOURCE = ROOT / "recipes/digits_source.yaml"


def run(workdir, name, *overrides, recipe=SOURCE):
    return train(load_recipe(recipe, [*QUICK, *overrides]), output=str(workdir / "options" / name))


def test_gradient_accumulation_counts_optimizer_steps(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    plain = records(run(workdir, "accum1", "train.epochs=1"))
    accumulated = records(run(workdir, "accum2", "train.epochs=1", "train.grad_accum=2"))
    # 3 batches of 16: 3 steps, or with accumulation of 2, one after 2 batches and one at the end.
    assert plain[-1]["step"] == 3 and accumulated[-1]["step"] == 2


def test_gradient_clipping_bounds_the_update(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    common = [
        "train.epochs=1",
        "train.optimizer=sgd",
        "train.momentum=0",
        "train.lr=0.1",
        "train.weight_decay=0",
        "train.scheduler=constant",
    ]
    start = epoch_end_weights(run(workdir, "noop", "train.epochs=1", "train.lr=1e-30"))
    free = epoch_end_weights(run(workdir, "free", *common))
    clipped = epoch_end_weights(run(workdir, "clipped", *common, "train.clip_grad=1e-4"))

    def moved(state):
        return torch.sqrt(
            sum(
                ((state[k] - start[k]).float() ** 2).sum()
                for k in start
                if "running" not in k and "num_batches" not in k
            )
        )

    # Two SGD steps of lr 0.1 on gradients clipped to norm 1e-4 move the weights by at most 2e-5.
    assert moved(clipped) <= 2e-5 + 1e-7 and moved(free) > 1e-3


def test_early_stopping_stops_when_the_metric_stalls(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    out = records(
        run(workdir, "early", "train.epochs=6", "train.lr=1e-30", "train.early_stopping.patience=2")
    )
    assert len(out) == 3  # best at epoch 0, then two epochs without improvement
    assert "early stopping" in capsys.readouterr().out


def test_bf16_runs_under_autocast(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    full = records(run(workdir, "fp32", "train.epochs=1"))[0]["train/loss"]
    mixed = records(run(workdir, "bf16", "train.epochs=1", "train.mixed_precision=bf16"))[0][
        "train/loss"
    ]
    assert mixed == pytest.approx(full, rel=0.05) and mixed != full  # same run, lower precision


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a CUDA GPU")
def test_fp16_without_gpu_is_a_clear_error(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        run(workdir, "fp16", "train.mixed_precision=fp16")


def test_layer_decay_and_phase_multipliers_reach_param_groups(workdir, source_run, monkeypatch):
    monkeypatch.chdir(workdir)
    run_dir = run(
        workdir,
        "decay",
        "train.epochs=2",
        f"model.weights={source_run}",
        "schedule.layer_decay=0.5",
        "train.scheduler=constant",
        recipe=ROOT / "recipes/digits_transfer.yaml",
    )
    lr = records(run_dir)[-1][
        "lr"
    ]  # phase 1: layer3 x0.3, layer4 x1.0; decay 0.5 per group from the top
    assert lr["heads"] == pytest.approx(0.003)
    assert lr["layer4"] == pytest.approx(0.003 * 0.5)
    assert lr["layer3"] == pytest.approx(0.003 * 0.3 * 0.25)
    assert lr["stem"] == pytest.approx(0.003 * 0.5**5)


def test_schedules_and_warmup():
    class Cfg:
        epochs, warmup_epochs, scheduler, step_size, gamma = 10, 1.0, "cosine", 3, 0.1

    assert schedule_factor(Cfg, 0, 10) == pytest.approx(1 / 11)
    assert schedule_factor(Cfg, 10, 10) == pytest.approx(1.0)
    assert schedule_factor(Cfg, 100, 10) == pytest.approx(0.0)
    Cfg.scheduler, Cfg.warmup_epochs = "step", 0.0
    assert [schedule_factor(Cfg, s * 10, 10) for s in (0, 2, 3, 6)] == pytest.approx(
        [1, 1, 0.1, 0.01]
    )


def test_chosen_metrics_and_monitor(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    out = records(run(workdir, "metrics", "train.epochs=1", "tasks.digit.metrics=[f1]"))
    assert [k for k in out[0] if k.startswith("val/")] == ["val/digit/f1", "val/digit/count"]
    with pytest.raises(UserError, match="Did you mean: val/digit/accuracy"):
        run(workdir, "typo", "train.monitor=val/digit/acuracy")


def test_tensorboard_and_eval_on_other_data(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    run_dir = run(workdir, "tb", "train.epochs=1")
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(run_dir),
                "--data",
                "data/digits/source/manifest.csv",
                "--split",
                "train",
                "--json",
            ]
        )
        == 0
    )
    values = json.loads(capsys.readouterr().out)
    assert set(values) == {
        "train/digit/accuracy",
        "train/digit/f1",
        "train/digit/auroc",
        "train/digit/ece",
        "train/digit/count",
    }
    # All of the other data: the run's max_samples (48) and carving do not apply to it.
    rows = len((workdir / "data/digits/source/manifest.csv").read_text().splitlines()) - 1
    assert values["train/digit/count"] == rows
    assert main(["eval", str(run_dir), "--split", "test"]) == 2


def test_a_multi_task_run_can_keep_the_epoch_with_the_best_mean_score(workdir, monkeypatch):
    """`train.monitor: val/mean_score` ranks an epoch by its tasks' accuracy and R^2 averaged
    (what `fit` scores its trials on), so no single task decides which model is kept."""
    monkeypatch.chdir(workdir)
    recipe = str(ROOT / "recipes/digits_transfer.yaml")
    fixed = ["model.weights=none", "data.max_samples=48", "train.epochs=3", "train.batch_size=16",
             "data.num_workers=0"]  # fmt: skip
    folder = train(load_recipe(recipe, [*fixed, "train.monitor=val/mean_score"]),
                   output=str(workdir / "options" / "mean_score"))  # fmt: skip
    rows = records(folder)
    for row in rows:
        parts = [row["val/digit/accuracy"], row["val/parity/accuracy"], row["val/ink/r2"]]
        assert row["val/mean_score"] == pytest.approx(sum(parts) / 3)
    summary = json.loads((folder / "complete.json").read_text())
    assert summary["monitor"] == "val/mean_score"
    best = max(rows, key=lambda r: r["val/mean_score"])
    assert summary["best_epoch"] == best["epoch"]
    # Only where every task has its accuracy or R^2 among its metrics; no record has it unasked.
    with pytest.raises(UserError, match="'val/mean_score' is not a validation metric"):
        train(load_recipe(recipe, [*fixed, "train.monitor=val/mean_score",
                                   "tasks.digit.metrics=[f1]"]),
              output=str(workdir / "options" / "mean_score_f1"))  # fmt: skip
    plain = records(train(load_recipe(recipe, [*fixed, "train.epochs=1"]),
                          output=str(workdir / "options" / "no_mean_score")))  # fmt: skip
    assert "val/mean_score" not in plain[0]
