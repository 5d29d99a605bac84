"""Reliability: exact resume after SIGKILL, atomic and safe checkpoints, non-finite losses,
mismatched run folders and unwritable outputs."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, ROOT, epoch_end_weights, records

from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.inference.run import load as load_run
from transferkit.recipes import load_recipe
from transferkit.rundir import RunDir

CLI = str(Path(sys.executable).parent / "transferkit")

# Everything that makes resuming hard at once: dropout in the heads, strong augmentation in two
# worker processes, a phase change at epoch 1 (10 steps per epoch), a checkpoint every step.
RESUME_RECIPE = """
name: resume
seed: 3
model: {backbone: "timm:test_resnet"}
tasks:
  digit: {kind: multiclass, dropout: 0.3}
  ink: {kind: regression, hidden: 16, dropout: 0.2}
data: {source: manifest, path: data/digits/transfer/manifest.csv, val_split: null, image_size: 32,
       augment: strong, max_samples: 160, num_workers: 2}
schedule:
  phases:
    - {from_epoch: 0, freeze: "up_to:layer2"}
    - {from_epoch: 1, freeze: "up_to:stem"}
train: {epochs: 3, batch_size: 16, lr: 0.003, checkpoint_every: 1, keep_checkpoints: 2}
"""


def _newest_step(run_dir: Path) -> int:
    checkpoints = RunDir(run_dir).checkpoints()
    return int(checkpoints[-1].name.split("_")[1]) if checkpoints else -1


@pytest.fixture(scope="module")
def resume_recipe(workdir):
    path = workdir / "resume.yaml"
    path.write_text(RESUME_RECIPE)
    return path


@pytest.fixture(scope="module")
def uninterrupted(workdir, resume_recipe):
    run_dir = workdir / "resume_full"
    subprocess.run(
        [CLI, "train", str(resume_recipe), "--output", str(run_dir)],
        cwd=workdir,
        check=True,
        capture_output=True,
    )
    return epoch_end_weights(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_step", [4, 10, 17])
def test_sigkill_then_resume_is_bit_identical(
    workdir, resume_recipe, uninterrupted, kill_after_step
):
    """Kill a real training process (mid-epoch, at and across the unfreeze boundary; it may be
    in the middle of writing a checkpoint), resume, and get exactly the uninterrupted weights."""
    run_dir = workdir / f"resume_killed_{kill_after_step}"
    process = subprocess.Popen([CLI, "train", str(resume_recipe), "--output", str(run_dir)], cwd=workdir,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while (
        _newest_step(run_dir) < kill_after_step
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _newest_step(run_dir)
    assert kill_after_step <= killed_at < 30, "the run finished before it could be killed"
    result = subprocess.run(
        [CLI, "train", "--resume", str(run_dir)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"step {killed_at})" in result.stdout  # it resumed from the newest complete checkpoint
    resumed = epoch_end_weights(run_dir)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert [r["epoch"] for r in records(run_dir)] == [0, 1, 2]


@pytest.fixture
def short_run(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    recipe = load_recipe(ROOT / "recipes/digits_source.yaml", [*QUICK, "train.checkpoint_every=1"])
    run_dir = workdir / "runs" / f"short_{time.monotonic_ns()}"
    train(recipe, output=str(run_dir))
    return run_dir


def test_resume_ignores_a_half_written_checkpoint(short_run):
    newest = RunDir(short_run).checkpoints()[-1]
    partial = short_run / "checkpoints" / ".tmp_step_00000099"
    shutil.copytree(newest, partial)
    (partial / "trainer_state.json").unlink()  # a save killed before completing
    assert RunDir(short_run).checkpoints()[-1] == newest


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_random_state_is_an_error(short_run, damage):
    rng = RunDir(short_run).checkpoints()[-1] / "random_states_0.pkl"
    if damage == "missing":
        rng.unlink()
    else:
        rng.write_bytes(rng.read_bytes()[:40])
    with pytest.raises(
        UserError, match="incomplete" if damage == "missing" else "cannot be loaded safely"
    ):
        train(load_recipe(short_run / "recipe.yaml"), resume=str(short_run))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['TRANSFERKIT_PWNED']}",))


def test_planted_pickle_in_a_checkpoint_never_runs(short_run, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TRANSFERKIT_PWNED", str(marker))
    newest = RunDir(short_run).checkpoints()[-1]
    torch.save({"epoch": 1, "payload": _Exploit()}, newest / "custom_checkpoint_0.pkl")
    with pytest.raises(UserError, match="never runs"):
        train(load_recipe(short_run / "recipe.yaml"), resume=str(short_run))
    assert not marker.exists()


def test_resume_with_changed_tasks_is_clear(short_run):
    recipe = load_recipe(short_run / "recipe.yaml", ["tasks.digit.kind=regression"])
    with pytest.raises(UserError, match="recipe .* changed"):
        train(recipe, resume=str(short_run))


def _poisoned_manifest(workdir: Path) -> Path:
    """The transfer manifest with one regression label whose squared error overflows."""
    source = workdir / "data" / "digits" / "transfer"
    rows = list(csv.DictReader((source / "manifest.csv").open()))
    for row in rows[5:8]:
        row["ink"] = "1e30"  # finite, but its squared error overflows float32
    path = source / "poisoned.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _poisoned_recipe(workdir: Path, *extra: str):
    # In raw units: standardized by the training split's sd (itself about 1e29), the error
    # would be finite.
    overrides = [f"data.path={_poisoned_manifest(workdir)}", "tasks.ink.standardize=false",
                 "data.max_samples=null", "data.val_fraction=0.1",
                 "train.epochs=1", "train.checkpoint_every=1", "model.weights=none", "schedule.phases.1.from_epoch=5", *extra]  # fmt: skip
    return load_recipe(ROOT / "recipes/digits_transfer.yaml", overrides)


def test_nonfinite_loss_stops_naming_task_and_step_and_keeps_checkpoints(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    run_dir = workdir / "runs" / "nan_stop"
    with pytest.raises(
        UserError, match=r"non-finite loss for task ink at epoch 0, step \d+"
    ) as info:
        train(_poisoned_recipe(workdir), output=str(run_dir))
    step = int(re.search(r"step (\d+)", str(info.value)).group(1))
    if step > 1:  # the poisoned row was not in the very first batch: earlier steps are kept
        assert _newest_step(run_dir) == step - 1


def test_nonfinite_loss_can_be_skipped_and_counted(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    run_dir = train(
        _poisoned_recipe(workdir, "train.nonfinite=skip"), output=str(workdir / "runs" / "nan_skip")
    )
    assert 1 <= records(run_dir)[-1]["skipped_steps"] <= 3  # the batches holding a poisoned row
    assert all(
        torch.isfinite(v).all()
        for v in epoch_end_weights(run_dir).values()
        if v.is_floating_point()
    )


def test_run_folder_with_other_tasks_is_clear(short_run, workdir, monkeypatch):
    info = json.loads((short_run / "model.json").read_text())
    info["tasks"][0]["num_outputs"] = 7
    info["tasks"][0]["class_names"] = None
    tampered = workdir / "runs" / "tampered"
    shutil.copytree(short_run, tampered, dirs_exist_ok=True)
    (tampered / "model.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="does not match"):
        load_run(tampered)
    monkeypatch.chdir(workdir)
    with pytest.raises(UserError, match="does not match the data"):
        from transferkit.runs import evaluate_run

        evaluate_run(short_run, data="data/digits/transfer/manifest.csv")


def test_unwritable_output_folder(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    blocker = workdir / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write the run folder"):
        train(load_recipe(ROOT / "recipes/digits_source.yaml", QUICK), output=str(blocker / "run"))


@pytest.mark.parametrize("opt_in", [False, True])
def test_hub_datasets_run_remote_code_only_when_the_recipe_asks(monkeypatch, opt_in):
    import datasets

    from transferkit.data.sources import read_source

    seen = {}

    def fake_load_dataset(name, **kwargs):
        seen.update(kwargs, name=name)
        return datasets.Dataset.from_dict({"image": [], "label": []})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_recipe(
        ROOT / "recipes/digits_source.yaml",
        [
            "data.source=hub",
            "data.path=someone/dataset",
            f"data.trust_remote_code={str(opt_in).lower()}",
        ],
    ).data
    read_source(data)
    assert seen["name"] == "someone/dataset"
    assert seen.get("trust_remote_code", False) is opt_in


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM stop at a step boundary with a checkpoint; a full disk is one line


class _AskedAfter:
    """A stop request that a signal makes after the loop has looked at it `checks` times."""

    def __init__(self, checks: int, signum: int = signal.SIGINT) -> None:
        self.checks, self.asked, self.wanted = checks, 0, signum

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    @property
    def signum(self) -> int:
        self.asked += 1
        return self.wanted if self.asked > self.checks else 0


# timm's policies draw from Python's and NumPy's RNGs as well as torch's: each is seeded from
# the sample's position, so a resume (and any worker) draws what the uninterrupted run drew.
AUGMENTED = ["data.augment=rand-m9-mstd0.5-inc1", "data.random_erasing=0.5",
             "data.scale=[0.3, 1.0]", "data.num_workers=1"]  # fmt: skip


@pytest.mark.parametrize(
    "augment", [[], AUGMENTED, ["data.augment=light", "distill.alpha=0.7"]],
    ids=["no augmentation", "timm policy", "distilled from a teacher"],
)  # fmt: skip
def test_a_stop_request_saves_at_the_step_and_resumes_exactly(
    workdir, monkeypatch, tmp_path, augment, source_run
):
    """In-process: asked to stop during the second epoch, the run saves a mid-epoch checkpoint
    at that step and raises `Interrupted`; resumed, it ends as the run that was never stopped."""
    from transferkit.engine import trainer as trainer_module
    from transferkit.errors import Interrupted

    monkeypatch.chdir(workdir)
    if any(o.startswith("distill.") for o in augment):  # the teacher sees each augmented batch
        augment = [*augment, f"distill.teacher={source_run}", "model.backbone=timm:test_vit"]
    recipe = load_recipe(ROOT / "recipes/digits_source.yaml", [*QUICK, "train.epochs=3", *augment])
    whole = RunDir(train(recipe, output=str(tmp_path / "whole")))
    monkeypatch.setattr(trainer_module, "StopRequest", lambda: _AskedAfter(checks=5))
    with pytest.raises(Interrupted) as stopped:
        train(recipe, output=str(tmp_path / "stopped"))
    assert stopped.value.exit_code == 130 and stopped.value.step == 5
    # The loaders' workers persist across epochs and stop with the run, even while the held
    # exception's frames (a notebook's last traceback) still reference its loaders.
    assert not multiprocessing.active_children()
    assert f"--resume {tmp_path / 'stopped'}" in str(stopped.value)
    run = RunDir(tmp_path / "stopped")
    assert run.checkpoints()[-1].name == "step_00000005" and not run.is_complete()
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    train(load_recipe(run.recipe_path), resume=str(run.path))
    assert [r["epoch"] for r in run.records()] == [0, 1, 2]
    resumed, expected = epoch_end_weights(run.path), epoch_end_weights(whole.path)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    # Identical tensors and metadata, identical bytes: a resumed run's model hashes the same.
    assert run.weights_path.read_bytes() == whole.weights_path.read_bytes()


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(workdir, monkeypatch, tmp_path):
    """The second epoch's checkpoint fails as a full disk fails (safetensors' message): one
    line naming the folder and the size a checkpoint takes; the first checkpoint resumes."""
    from accelerate import Accelerator
    from safetensors import SafetensorError

    monkeypatch.chdir(workdir)
    recipe = load_recipe(ROOT / "recipes/digits_source.yaml", QUICK)
    save_state, calls = Accelerator.save_state, []

    def full_disk(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            raise SafetensorError(
                "Error while serializing: IoError(No space left on device (os error 28))"
            )
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    run_dir = tmp_path / "full"
    with pytest.raises(UserError) as error:
        train(recipe, output=str(run_dir))
    message = str(error.value)
    assert "\n" not in message and error.value.__suppress_context__
    assert message.startswith(f"no space left on the device of {run_dir} (about ")
    assert "MB a checkpoint" in message and f"--resume {run_dir}" in message
    assert [p.name for p in RunDir(run_dir).checkpoints()] == ["step_00000003_end"]
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    train(load_recipe(run_dir / "recipe.yaml"), resume=str(run_dir))
    assert RunDir(run_dir).is_complete()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_real_run_cleanly_and_it_resumes_bit_identically(
    workdir, resume_recipe, uninterrupted, signum
):
    """Ctrl-C (SIGINT) or SIGTERM on a real `transferkit train`: exit 130 / 143 with one line
    that says how to resume, no traceback; resumed, the weights equal the uninterrupted run's.
    A second signal ends the process at once."""
    run_dir = workdir / f"resume_signal_{signum}"
    process = subprocess.Popen([CLI, "train", str(resume_recipe), "--output", str(run_dir)],
                               cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while _newest_step(run_dir) < 6 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out
    assert f"the run is saved: continue it with `transferkit train --resume {run_dir}`" in err
    stopped_at = _newest_step(run_dir)
    assert 6 <= stopped_at < 30
    result = subprocess.run([CLI, "train", "--resume", str(run_dir)], cwd=workdir,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"step {stopped_at})" in result.stdout
    resumed = epoch_end_weights(run_dir)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    # Twice: the second signal does not wait for the step.
    twice = subprocess.Popen([CLI, "train", str(resume_recipe), "--output", str(run_dir) + "_2"],
                             cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    while _newest_step(Path(str(run_dir) + "_2")) < 2 and twice.poll() is None:
        time.sleep(0.01)
    twice.send_signal(signal.SIGINT)
    twice.send_signal(signal.SIGINT)
    start = time.monotonic()
    twice.communicate(timeout=60)
    assert twice.returncode == 130 and time.monotonic() - start < 30
