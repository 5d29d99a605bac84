"""The run-folder contract (`RunDir`), and the defects that came from reading files by hand:
sweeps that took a half-finished run for a finished one, `eval --data` that capped and carved
the other data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import QUICK, ROOT

from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.recipes import load_recipe
from transferkit.rundir.folder import COMPLETE, MODEL_INFO, RunDir, checkpoint_name
from transferkit.runs import evaluate_run
from transferkit.select.grid_sweep import parse_grid, run_name, sweep


def test_a_finished_run_reads_through_rundir(source_run):
    run = RunDir(source_run)
    assert run.is_complete() and run.has_model()
    records = run.records()
    assert [r["epoch"] for r in records] == [0, 1]
    assert run.final() == records[-1]
    summary = run.summary()
    assert summary["stopped"] == "finished" and summary["epochs"] == 2
    best = run.best()
    assert best["epoch"] == summary["best_epoch"] == run.info().epoch
    assert best[summary["monitor"]] == max(r[summary["monitor"]] for r in records)
    history = run.history()
    assert list(history["epoch"]) == [0, 1] and "lr/heads" in history.columns
    checkpoints = run.checkpoints()
    assert checkpoints and checkpoints[-1].name == checkpoint_name(records[-1]["step"], True)
    assert run.recipe().name == "digits_source"


def test_an_unfinished_folder_says_so(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_complete() and not run.has_model() and run.records() == []
    with pytest.raises(UserError, match="not a finished run"):
        run.summary()
    with pytest.raises(UserError, match="no model"):
        run.info()
    with pytest.raises(UserError, match="no finished epoch"):
        run.final()
    with pytest.raises(UserError, match="not a run folder"):
        run.recipe()


def test_a_sweep_resumes_a_run_killed_after_its_first_best_epoch(workdir, monkeypatch):
    """Before the completion marker, a sweep took any folder with model.json as finished: a run
    killed after its first epoch (which always writes the best model so far) was never resumed."""
    monkeypatch.chdir(workdir)
    recipe = str(ROOT / "recipes/digits_source.yaml")
    fixed = [*QUICK, "data.num_workers=0"]
    grid = parse_grid(["train.epochs=2"])
    root = workdir / "killed_sweep"
    folder = root / run_name(0, {"train.epochs": 2})
    # As if killed after epoch 0: model.json and an epoch-end checkpoint, no marker.
    train(load_recipe(recipe, [*fixed, "train.epochs=1"]), output=str(folder))
    (folder / COMPLETE).unlink()
    assert (folder / MODEL_INFO).is_file()

    sweep(recipe, grid, str(root), fixed)

    run = RunDir(folder)
    assert run.is_complete()
    assert [r["epoch"] for r in run.records()] == [0, 1]  # resumed, not skipped
    assert "resumed from" in (folder / "train.log").read_text()


def test_eval_on_other_data_uses_all_of_it(source_run, workdir, monkeypatch):
    """`eval --data X` must not apply the run's max_samples or validation carving to X."""
    monkeypatch.chdir(workdir)
    manifest = workdir / "data/digits/source/manifest.csv"
    rows = len(manifest.read_text().splitlines()) - 1
    assert load_recipe(RunDir(source_run).recipe_path).data.max_samples == 48
    values = evaluate_run(source_run, data=str(manifest))
    assert values["validation/digit/count"] == rows
    # Its own validation split is still the carved and capped one.
    assert evaluate_run(source_run)["validation/digit/count"] <= 48


def test_resume_clears_the_marker_until_the_run_ends_again(source_run, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(source_run.parent.parent)
    copy = tmp_path / "copy"
    shutil.copytree(source_run, copy)
    recipe = RunDir(copy).recipe(["train.epochs=3"])
    train(recipe, resume=str(copy))
    run = RunDir(copy)
    assert run.is_complete() and [r["epoch"] for r in run.records()] == [0, 1, 2]
    assert json.loads((copy / COMPLETE).read_text())["epochs"] == 3


def test_a_run_reads_its_relative_data_paths_from_any_directory(source_run, tmp_path, monkeypatch):
    """The recipe says data/digits/...: relative to where training ran (origin.json), not to
    wherever eval, export or resume is run from."""
    run = RunDir(source_run)
    written = load_recipe(run.recipe_path)
    assert not written.data.path.startswith("/")  # the recipe on disk keeps what the user wrote
    monkeypatch.chdir(tmp_path)
    assert run.recipe().data.path == str(run.origin() / written.data.path)
    assert evaluate_run(run)["validation/digit/count"] > 0
    monkeypatch.chdir(run.origin())  # from where it ran, the path is left as written
    assert run.recipe().data.path == written.data.path


def test_a_resume_from_another_directory_keeps_the_written_paths(source_run, tmp_path, monkeypatch):
    """Resolving data.path from origin.json is for reading: the resumed run's recipe.yaml
    still says what the user wrote, not this machine's absolute path."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(source_run, copy)
    written = load_recipe(copy / "recipe.yaml").data.path
    monkeypatch.chdir(tmp_path)  # the relative path does not exist from here
    train(RunDir(copy).recipe(["train.epochs=3"]), resume=str(copy))
    saved = load_recipe(copy / "recipe.yaml")
    assert saved.data.path == written and saved.train.epochs == 3


def test_the_default_batch_size_is_recorded_for_resume(workdir, tmp_path, monkeypatch):
    """With train.batch_size left to the default rule, recipe.yaml records the size it chose,
    so a resume trains with the same batches whatever the rule or the data become."""
    monkeypatch.chdir(workdir)
    recipe = load_recipe(ROOT / "recipes/digits_source.yaml", [*QUICK, "train.batch_size=null"])
    assert recipe.train.batch_size is None
    run = RunDir(train(recipe, output=str(tmp_path / "run")))
    assert recipe.train.batch_size is None  # the caller's recipe is left as it was
    assert load_recipe(run.recipe_path).train.batch_size == 8  # under 241 training images: 8
    assert run.recipe().train.batch_size == 8
    # the fine-tune rate the rule chose is recorded the same way
    assert recipe.schedule.unfrozen_lr_mult is None
    assert run.recipe().schedule.unfrozen_lr_mult == 0.25


def test_a_run_saved_before_a_schedule_key_existed_keeps_its_old_meaning(source_run, tmp_path):
    """Keys added with new defaults (a cycle per phase, a lower rate after a probe, phase
    warmup, fixed batch-norm statistics) mean what the engine did before them when a saved
    run's recipe lacks them, so resuming an older run keeps its schedule."""
    import shutil

    import yaml

    old = tmp_path / "old"
    shutil.copytree(source_run, old, ignore=shutil.ignore_patterns("checkpoints"))
    data = yaml.safe_load((old / "recipe.yaml").read_text())
    assert data["schedule"]["lr_cycle"] == "phase"  # today's runs record every key
    assert RunDir(old).recipe().schedule.lr_cycle == "phase"
    # A recorded value wins over today's default: a run saved under an older default resumes
    # with it (unfrozen_lr_mult was 0.2 before it became 0.25).
    (old / "recipe.yaml").write_text(
        yaml.safe_dump({**data, "schedule": {**data["schedule"], "unfrozen_lr_mult": 0.2}})
    )
    assert RunDir(old).recipe().schedule.unfrozen_lr_mult == 0.2
    for key in ("lr_cycle", "unfrozen_lr_mult", "phase_warmup_epochs", "norm_stats"):
        del data["schedule"][key]
    (old / "recipe.yaml").write_text(yaml.safe_dump(data))
    schedule = RunDir(old).recipe().schedule
    assert (schedule.lr_cycle, schedule.unfrozen_lr_mult) == ("run", 1.0)
    assert (schedule.phase_warmup_epochs, schedule.norm_stats) == (0.0, "train")
    assert RunDir(old).recipe(["schedule.lr_cycle=phase"]).schedule.lr_cycle == "phase"


# ---------------------------------------------------------------------------------------------
# A run folder belongs to one run at a time

CLI = [sys.executable, "-m", "transferkit.cli"]


def _cli(args: list[str], cwd, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*CLI, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_ends_intact(workdir, tmp_path):
    """Two real processes: the second `train` (and a `--resume`) on the folder the first is
    training into exits 2 with one line, and the first run ends as it would have alone."""
    recipe = str(ROOT / "recipes/digits_source.yaml")
    folder = tmp_path / "shared"
    first = _cli(["train", recipe, "--output", str(folder), "--set", "train.epochs=4",
                  "--set", "data.max_samples=96", "--set", "train.lr=0.01"], workdir)  # fmt: skip
    lock = folder / ".lock"
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().startswith("pid"):
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could start"
    first.send_signal(signal.SIGSTOP)  # paused mid-run, its claim held, while the others try
    for args in (["train", recipe, "--output", str(folder), "--set", "train.lr=0.001"],
                 ["train", "--resume", str(folder)]):  # fmt: skip
        second = _cli(args, workdir)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert err.count("\n") == 1 and "is in use by a run that is still training" in err
        assert f"pid {first.pid} " in err
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    run = RunDir(folder)
    assert run.is_complete() and [r["epoch"] for r in run.records()] == [0, 1, 2, 3]
    assert run.recipe().train.lr == 0.01  # the recipe the run trained with, not the refused one's


def test_a_killed_run_s_lock_is_free_though_a_forked_worker_lives_on(tmp_path):
    """A run killed with SIGKILL while a forked child (a data-loader worker) still lives: the
    child closed its copy of the lock as it started, so the folder can be claimed at once (a
    resume was refused while workers took their seconds to notice)."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys, time\n"
        "from transferkit.rundir import RunDir\n"
        "with RunDir(sys.argv[1]).claimed():\n"
        "    if os.fork() == 0:  # the worker: off the test's pipe, asleep past the claim\n"
        "        null = os.open(os.devnull, os.O_WRONLY)\n"
        "        os.dup2(null, 1)\n"
        "        os.dup2(null, 2)\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    print('claimed', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    folder = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert run.stdout.strip() == "claimed" and run.returncode == -signal.SIGKILL
    with RunDir(folder).claimed():  # the child sleeps on, and the claim is free
        pass


def test_a_new_run_into_a_folder_holding_one_is_refused_with_the_ways_out(source_run, tmp_path,
                                                                         monkeypatch, capsys):  # fmt: skip
    import shutil

    from transferkit.cli import main

    folder = tmp_path / "taken"
    shutil.copytree(source_run, folder)
    monkeypatch.chdir(RunDir(source_run).origin())
    epochs = len(RunDir(folder).records())
    assert main(["train", "digits_source", "--output", str(folder), *_sets(QUICK)]) == 2
    err = capsys.readouterr().err
    assert f"already holds a finished run; continue it with --resume {folder}" in err
    assert "--overwrite" in err and len(RunDir(folder).records()) == epochs  # nothing touched
    assert main(["train", "digits_source", "--output", str(folder), "--overwrite",
                 *_sets([*QUICK, "train.epochs=1"])]) == 0  # fmt: skip
    assert [r["epoch"] for r in RunDir(folder).records()] == [0]  # cleared, then one epoch
    assert len(RunDir(folder).checkpoints()) == 1


def _sets(overrides: list[str]) -> list[str]:
    return [part for o in overrides for part in ("--set", o)]
