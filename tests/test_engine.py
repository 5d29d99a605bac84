"""The fine-tuning engine end to end: shipped recipes, CLI, run folders, phases, LRs, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK, ROOT, epoch_end_weights, free_port
from conftest import records as _records
from safetensors.torch import load_file

import transferkit
from transferkit.cli import main
from transferkit.engine import train
from transferkit.recipes import load_recipe
from transferkit.rundir import RunDir

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_runs_briefly(
    recipe_path, workdir, source_run, monkeypatch
):
    text = recipe_path.read_text()
    assert (
        text.startswith("#") and "transferkit train" in text.split("\n\n")[0]
    )  # says how to launch it
    monkeypatch.chdir(workdir)
    overrides = [*QUICK, "train.max_steps=2", f"model.weights={source_run / 'model.safetensors'}"]
    if "weights: none" in text or "weights: pretrained" in text:
        overrides.pop()  # its own weights: random, or the packaged ImageNet checkpoint
    run_dir = train(
        load_recipe(recipe_path, overrides), output=str(workdir / "brief" / recipe_path.stem)
    )
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "model.json").is_file()
    assert (run_dir / "recipe.yaml").is_file() and _records(run_dir)


def test_transfer_run_folder_eval_predict_and_load(workdir, source_run, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    run_dir = workdir / "runs" / "transfer"
    args = [
        "train",
        str(ROOT / "recipes/digits_transfer.yaml"),
        "--output",
        str(run_dir),
        "--set",
        f"model.weights={source_run}",
    ]
    for override in [*QUICK, "train.epochs=3", "data.max_samples=64"]:
        args += ["--set", override]
    assert main(args) == 0
    records = _records(run_dir)
    assert [r["phase"] for r in records] == [0, 1, 1]
    # Discriminative LRs reach the optimizer's param groups: layer3 runs at 0.3x layer4.
    lr = records[-1]["lr"]
    assert lr["layer3"] == pytest.approx(0.3 * lr["layer4"]) and lr["heads"] == pytest.approx(
        lr["layer4"]
    )
    assert {
        "val/digit/accuracy",
        "val/parity/f1",
        "val/ink/r2",
        "val/digit/auroc",
        "val/ink/mae",
    } <= records[-1].keys()
    # The stem stayed frozen through both phases, BatchNorm statistics included.
    source = load_file(str(source_run / "model.safetensors"))
    final = epoch_end_weights(run_dir)  # the last epoch
    stem = [
        k
        for k in final
        if k.startswith("backbone.model.conv1") or k.startswith("backbone.model.bn1")
    ]
    assert stem and all(torch.equal(final[k], source[k]) for k in stem)
    moved = [
        k
        for k in final
        if k.startswith("backbone.model.layer4") and not torch.equal(final[k], source[k])
    ]
    assert moved

    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert 0.0 <= values["validation/digit/accuracy"] <= 1.0 and "validation/ink/r2" in values

    images = workdir / "data" / "digits" / "transfer" / "images"
    assert main(["predict", str(run_dir), str(sorted(images.iterdir())[0]), "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)[0]
    assert prediction["digit"]["label"] in {"5", "6", "7", "8", "9"}
    assert prediction["parity"]["label"] in {"even", "odd"} and "value" in prediction["ink"]

    run = transferkit.load(run_dir)
    assert set(run.tasks) == {"digit", "parity", "ink"} and not run.model.training


def test_resume_lands_in_the_right_phase(workdir, source_run, monkeypatch):
    monkeypatch.chdir(workdir)
    recipe = ROOT / "recipes/digits_transfer.yaml"
    base = [*QUICK, f"model.weights={source_run}"]
    run_dir = workdir / "runs" / "resumed"
    train(load_recipe(recipe, [*base, "train.epochs=1"]), output=str(run_dir))
    assert [r["phase"] for r in _records(run_dir)] == [0]
    train(load_recipe(recipe, [*base, "train.epochs=3"]), resume=str(run_dir))
    records = _records(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2] and [r["phase"] for r in records] == [0, 1, 1]
    kept = [p.name for p in RunDir(run_dir).checkpoints()]
    state = json.loads((run_dir / "checkpoints" / kept[-1] / "trainer_state.json").read_text())
    assert kept[-2:] == ["step_00000006_end", "step_00000009_end"]  # keep_checkpoints: 2
    assert set(kept) == {"step_00000006_end", "step_00000009_end", state["best_checkpoint"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lr=fast"], "train.lr"),
        (["--set", "train.learning_rate=0.1"], "Did you mean: lr"),
        (["--set", "schedule.phases.0.freeze=up_to:layer9"], "layer9"),
        (["--set", "tasks.digit.column=nope"], "nope"),
    ],
)
def test_user_errors_exit_2_with_one_line(workdir, args, message):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "transferkit"), "train", str(ROOT / "recipes/digits_source.yaml"), "--output", str(workdir / "bad"), *args],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_resume_without_checkpoint_is_clear(workdir):
    empty = workdir / "empty_run"
    empty.mkdir(exist_ok=True)
    shutil.copy(ROOT / "recipes/digits_source.yaml", empty / "recipe.yaml")
    assert main(["train", "--resume", str(empty)]) == 2


DDP_RECIPE = """
name: ddp
seed: 0
model: {backbone: "timm:test_vit", kwargs: {img_size: 32}}
tasks: {digit: {kind: multiclass}}
data: {source: manifest, path: data/digits/source/manifest.csv, val_split: null, image_size: 32, augment: none, max_samples: 256}
schedule:
  phases:
    - {from_epoch: 0, freeze: "up_to:blocks.4"}
    - {from_epoch: 1, freeze: "up_to:blocks.2"}
train: {epochs: 2, batch_size: BATCH, optimizer: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0, scheduler: constant}
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_across_an_unfreeze(workdir):
    """torchrun with 2 gloo processes ends with the weights of 1 process at the same global batch,
    blocks unfrozen mid-run included (their gradients are all-reduced after the phase change).

    SGD, because Adam divides by the gradient's magnitude: on parameters with near-zero
    gradients it turns float summation-order noise (1e-9) into lr-sized steps.
    """
    finals, logs = {}, {}
    for procs, batch in ((1, 32), (2, 16)):
        recipe = workdir / f"ddp_{procs}.yaml"
        recipe.write_text(DDP_RECIPE.replace("BATCH", str(batch)))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_port", str(free_port()),
               "-m", "transferkit.cli", "train", str(recipe), "--output", str(workdir / f"ddp_{procs}")]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            cmd, cwd=workdir, capture_output=True, text=True, timeout=600, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        logs[procs] = result.stdout
        finals[procs] = epoch_end_weights(workdir / f"ddp_{procs}")
    assert logs[2].count("epoch 1: phase 1") == 1  # printed by the main process only: 2 real ranks
    first = epoch_end_weights(workdir / "ddp_2", 0)
    unfrozen = [
        k for k in finals[2] if k.startswith("backbone.model.blocks.3.") and k.endswith("weight")
    ]
    assert unfrozen and all(not torch.equal(first[k], finals[2][k]) for k in unfrozen)
    for key, value in finals[1].items():
        assert torch.allclose(value, finals[2][key], rtol=0, atol=1e-6), key
    # Validation counts every sample exactly once, though 2 ranks pad the last uneven batch.
    one, two = _records(workdir / "ddp_1")[-1], _records(workdir / "ddp_2")[-1]
    assert one["val/digit/count"] == two["val/digit/count"] == 180
    assert two["val/digit/accuracy"] == pytest.approx(one["val/digit/accuracy"], abs=1e-6)


def test_unreadable_images_are_skipped_and_listed(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    folder = workdir / "corrupt"
    shutil.copytree(workdir / "data" / "digits" / "source", folder, dirs_exist_ok=True)
    images = sorted((folder / "images").iterdir())
    images[0].write_bytes(b"not an image")
    images[1].write_bytes(images[2].read_bytes()[:60])  # a truncated PNG
    recipe = load_recipe(
        ROOT / "recipes/digits_source.yaml",
        [
            *QUICK,
            "data.max_samples=null",
            f"data.path={folder / 'manifest.csv'}",
            "train.max_steps=1",
            "train.epochs=1",
        ],
    )
    run_dir = train(recipe, output=str(workdir / "runs" / "corrupt"))
    listed = (run_dir / "skipped_images.txt").read_text().split()
    assert len(listed) == 2 and {images[0].name, images[1].name} <= {
        p.split("/")[-1] for p in listed
    }
    recipe.data.bad_images = "error"
    with pytest.raises(transferkit.UserError, match=images[0].name):
        train(recipe, output=str(workdir / "runs" / "corrupt_error"))
