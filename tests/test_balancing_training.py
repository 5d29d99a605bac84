"""Multi-task methods inside real training runs: the Jacobian path against plain losses,
2 processes against 1, exact resume of stateful methods, and what the run logs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FULL_LABELS, epoch_end_weights, free_port, records
from torchjd import aggregation

from transferkit.balancing import METHODS, Method, TorchJDAggregator
from transferkit.engine import train
from transferkit.errors import UserError
from transferkit.recipes import load_recipe, parse_recipe


def _recipe(method: str, **overrides) -> dict:
    recipe = {
        "name": method,
        "seed": 1,
        "model": {"backbone": "timm:test_resnet"},
        "tasks": {
            "digit": {"kind": "multiclass"},
            "parity": {"kind": "binary", "classes": ["even", "odd"]},
        },  # fmt: skip
        "data": {
            "source": "manifest",
            "path": FULL_LABELS,
            "val_split": None,
            "image_size": 32,
            "augment": "none",
            "max_samples": 96,
        },  # fmt: skip
        "schedule": {"phases": [{"from_epoch": 0, "freeze": "up_to:layer1"}]},
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "optimizer": "sgd",
            "lr": 0.05,
            "weight_decay": 0.0,
            "scheduler": "constant",
        },  # fmt: skip
        "multitask": {"method": method},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        recipe[section][field] = value
    return recipe


def _train(workdir, recipe: dict, name: str) -> Path:
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return train(parse_recipe(recipe), output=str(workdir / "balance" / name))
    finally:
        os.chdir(cwd)


def test_jacobian_path_with_the_sum_aggregator_is_the_plain_loss_path(
    workdir, labelled, monkeypatch
):
    """torchjd's Sum through our Jacobian path gives the weights of `loss.backward()` on the sum:
    per-task rows, heads' own gradients, a frozen prefix, an auxiliary head on an intermediate
    group (nested shared features) and gradient accumulation all have to be right for this."""
    monkeypatch.setitem(
        METHODS, "jd_sum",
        Method("jd_sum", "gradient", "test", "torchjd Sum", lambda k, o: TorchJDAggregator(
            aggregation.Sum())),
    )  # fmt: skip
    extra = {"model__aux_heads": [{"task": "digit", "group": "layer2"}], "train__grad_accum": 2}
    plain = _train(workdir, _recipe("sum", **extra), "plain_sum")
    jacobian = _train(workdir, _recipe("jd_sum", **extra), "jacobian_sum")
    a, b = epoch_end_weights(plain), epoch_end_weights(jacobian)
    assert any(k.startswith("aux_heads.") for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=2e-6), key
    frozen = "backbone.model.layer1.0.conv1.weight"
    assert torch.equal(a[frozen], b[frozen])
    log = records(jacobian)[-1]
    assert {"mtl/weight/digit", "mtl/weight/parity", "mtl/weight/digit@layer2"} <= log.keys()
    assert "mtl/cos/digit|digit@layer2" in log


def test_weights_and_cosines_reach_metrics_and_tensorboard(workdir, labelled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _train(workdir, _recipe("upgrad", train__log_every=1), "logged_upgrad")
    log = records(run_dir)
    weights = [r["mtl/weight/digit"] for r in log]
    assert all(0 < w < 2 for w in weights)
    assert -1 <= log[-1]["mtl/cos/digit|parity"] <= 1
    (event_file,) = (run_dir / "tensorboard").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file)).Reload()
    tags = events.Tags()["scalars"]
    assert "train/mtl/weight/parity" in tags and "train/mtl/cos/digit|parity" in tags
    assert "mtl/weight/digit" in tags  # the epoch mean, as in metrics.jsonl


def test_loss_method_weights_are_logged_and_learned(workdir, labelled):
    run_dir = _train(workdir, _recipe("uw", train__lr=0.2), "uw")
    first, last = records(run_dir)[0], records(run_dir)[-1]
    # UW's weights 0.5 exp(-s) start at 0.5 and move as the log-variances learn.
    assert first["mtl/weight/digit"] != pytest.approx(0.5, abs=1e-4)
    assert last["mtl/weight/digit"] != last["mtl/weight/parity"]


@pytest.mark.parametrize("method", ["upgrad", "uw"])
def test_the_loss_scaler_changes_nothing_but_the_scale(workdir, labelled, monkeypatch, method):
    """fp16's loss scaling, with a CPU GradScaler standing in for the CUDA one that fp16 runs
    get (fp16 itself needs a GPU). Gradients of losses scaled by 2^16 unscale exactly, so the
    weights are those of the unscaled run bit for bit. The Jacobian path never calls
    `accelerator.backward`: it must start the scaler itself (its scale is created by `scale()`,
    and `optimizer.step()` refuses to run without it) and aggregate the unscaled Jacobian."""
    from transferkit.engine import trainer as engine_trainer

    make_accelerator = engine_trainer.make_accelerator

    def with_scaler(*args):
        accelerator = make_accelerator(*args)
        accelerator.scaler = torch.amp.GradScaler("cpu")  # read by prepare, backward, save_state
        return accelerator

    plain = _train(workdir, _recipe(method), f"unscaled_{method}")
    monkeypatch.setattr(engine_trainer, "make_accelerator", with_scaler)
    scaled = _train(workdir, _recipe(method), f"scaled_{method}")
    a, b = epoch_end_weights(plain), epoch_end_weights(scaled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    newest = sorted((scaled / "checkpoints").iterdir())[-1]
    assert torch.load(newest / "scaler.pt", weights_only=True)["scale"] == 2.0**16


@pytest.mark.parametrize("method", ["gradnorm", "famo", "dwa", "uw"])
def test_stateful_methods_resume_exactly(workdir, labelled, method):
    """Stop after step 9 of 18 (mid epoch 1, past DWA's first epoch average), resume, and get the
    uninterrupted weights bit for bit: the method's state travels with the checkpoint."""
    recipe = _recipe(method, train__epochs=3, train__checkpoint_every=1,
                     train__keep_checkpoints=40, data__max_samples=96)  # fmt: skip
    recipe["train"]["optimizer"] = "adamw"
    full = _train(workdir, recipe, f"resume_{method}_full")
    crashed = workdir / "balance" / f"resume_{method}_crashed"
    shutil.rmtree(crashed, ignore_errors=True)
    shutil.copytree(full, crashed)
    for checkpoint in (crashed / "checkpoints").iterdir():
        if int(checkpoint.name.split("_")[1]) > 9:
            shutil.rmtree(checkpoint)
    (crashed / "model.safetensors").unlink()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        train(load_recipe(crashed / "recipe.yaml"), resume=str(crashed))
    finally:
        os.chdir(cwd)
    a, b = epoch_end_weights(full), epoch_end_weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Epoch means of the weights match, but in the resumed epoch 1, which averages only the
    # steps trained after the resume (as its train/loss does).
    logged = [[r.get("mtl/weight/digit") for r in records(run)] for run in (full, crashed)]
    assert logged[0][0] == logged[1][0] and logged[0][2] == logged[1][2]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["pcgrad", "uw"])
def test_two_processes_match_one(workdir, labelled, method):
    """2 gloo processes (16 rows each) end with the weights of 1 process (32 rows). PCGrad is
    nonlinear and random: averaging per-rank aggregations, or drawing per rank, would differ.
    UW's log-variances live outside the DDP model and need their own all-reduce."""
    import yaml

    finals = {}
    for procs, batch in ((1, 32), (2, 16)):
        # A ViT: BatchNorm would normalise each rank's 16 rows on their own, unlike 32 rows.
        recipe = _recipe(method, train__batch_size=batch,
                         model__backbone="timm:test_vit", model__kwargs={"img_size": 32},
                         schedule__phases=[{"from_epoch": 0, "freeze": "up_to:blocks.2"}])  # fmt: skip
        path = workdir / f"balance_ddp_{method}_{procs}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = workdir / "balance" / f"ddp_{method}_{procs}"
        shutil.rmtree(out, ignore_errors=True)
        port = str(free_port())
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               "--master_port", port, "-m", "transferkit.cli", "train", str(path), "--output",
               str(out)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600,
                                env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        finals[procs] = epoch_end_weights(out)
        if procs == 2:
            assert result.stdout.count("epoch 1: phase") == 1  # two real ranks, one printer
    for key, value in finals[1].items():
        assert torch.allclose(value, finals[2][key], rtol=0, atol=1e-5), key


@pytest.mark.parametrize(
    "change, message",
    [({"multitask": {"method": "upgrad"}, "tasks": {"digit": {"kind": "multiclass",
       "weight": 2.0}}}, "tasks.digit.weight: static weights apply with multitask.method sum"),
     ({"multitask": {"method": "nashmtl"}}, "Did you mean: nash_mtl"),
     ({"multitask": {"method": "cagrad", "options": {"alpha": 1}}}, "multitask.options.alpha"),
     ({"multitask": {"method": "mgda", "lr": 0.1}}, "multitask.lr")],
)  # fmt: skip
def test_recipe_errors_name_the_key(change, message):
    recipe = _recipe("sum")
    for section, value in change.items():
        recipe[section] = value
    with pytest.raises(UserError, match=message):
        parse_recipe(recipe)


def test_mean_applies_the_recipes_static_weights_in_training(workdir, labelled):
    """`multitask.method: mean` with `tasks.digit.weight: 3`: the trainer passes the recipe's
    weights to the balancer, which logs w/K per task (K = 2 objectives)."""
    recipe = _recipe("mean")
    recipe["tasks"]["digit"]["weight"] = 3.0
    log = records(_train(workdir, recipe, "weighted_mean"))[-1]
    assert log["mtl/weight/digit"] == pytest.approx(1.5)
    assert log["mtl/weight/parity"] == pytest.approx(0.5)
