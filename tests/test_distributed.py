"""Several processes with the settings users use: 2 torchrun (gloo) processes against 1, at the
same global batch, with warmup, a cosine schedule, a phase change that unfreezes blocks,
per-group multipliers, layer decay and gradient accumulation.

A constant schedule in the first 2-process test hid a schedule that ran twice too fast under
two processes (Accelerate steps a prepared scheduler once per process at each optimizer step).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import epoch_end_weights, free_port, records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RECIPE = """
name: ddp_schedule
seed: 0
model: {backbone: "timm:test_vit", kwargs: {img_size: 32}}
tasks: {digit: {kind: multiclass}}
data: {source: manifest, path: data/digits/source/manifest.csv, val_split: null, image_size: 32,
       augment: none, max_samples: 256, num_workers: 0}
schedule:
  layer_decay: 0.8
  phases:
    - {from_epoch: 0, freeze: "up_to:blocks.4", lr_mult: {heads: 2.0}}
    - {from_epoch: 1, freeze: "up_to:blocks.2", lr_mult: {heads: 0.5}}
train: {epochs: 3, batch_size: BATCH, grad_accum: 2, optimizer: sgd, lr: 0.05, momentum: 0.9,
        weight_decay: 0.0, scheduler: cosine, warmup_epochs: 0.5, log_every: 1}
"""


def _torchrun(workdir: Path, procs: int, name: str, recipe_text: str, *extra: str) -> Path:
    result = _torchrun_result(workdir, procs, name, recipe_text, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / name


def _torchrun_result(workdir: Path, procs: int, name: str, recipe_text: str, *extra: str):
    """`transferkit train` under torchrun into `workdir/name`, however it ends."""
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(recipe_text)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
           "--master_port", str(free_port()), "-m", "transferkit.cli", "train",
           str(recipe), "--output", str(workdir / name), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900, env=env)


def _step_lrs(run_dir: Path) -> dict[str, dict[int, float]]:
    """Per group, the learning rate logged at every optimizer step (TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = (run_dir / "tensorboard").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0}).Reload()
    return {
        tag.removeprefix("train/lr/"): {e.step: e.value for e in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
        if tag.startswith("train/lr/")
    }


def test_two_processes_match_one_with_warmup_cosine_phases_decay_and_accumulation(workdir):
    runs = {
        procs: _torchrun(workdir, procs, f"sched_{procs}", RECIPE.replace("BATCH", str(batch)))
        for procs, batch in ((1, 32), (2, 16))
    }
    one, two = _step_lrs(runs[1]), _step_lrs(runs[2])
    assert set(one) == set(two) and {"heads", "blocks.5", "blocks.0"} <= set(one)
    steps = sorted(one["heads"])
    assert steps == sorted(two["heads"]) and len(steps) >= 9  # 3 epochs of 3 steps at least
    for group in one:
        for step in steps:
            assert two[group][step] == pytest.approx(one[group][step], rel=1e-6), (group, step)
    # The schedule is the one asked for: warmup rises, cosine reaches ~0 at the last step.
    heads = [one["heads"][s] for s in steps]
    assert heads[0] < heads[1] and heads[-1] < 0.05 * max(heads)
    # Per epoch, as metrics.jsonl records it.
    for a, b in zip(records(runs[1]), records(runs[2])):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-6)
    finals = {procs: epoch_end_weights(path) for procs, path in runs.items()}
    for key, value in finals[1].items():
        assert torch.allclose(value, finals[2][key], rtol=0, atol=1e-5), key


PROBE = """
name: ddp_probe
seed: 0
model: {backbone: "timm:test_resnet"}
tasks: {digit: {kind: multiclass}}
data: {source: manifest, path: data/digits/source/manifest.csv, val_split: null, image_size: 32,
       augment: none, max_samples: 200, num_workers: 0}
schedule: {phases: [{from_epoch: 0, freeze: all}]}
train: {epochs: 2, batch_size: 16, optimizer: sgd, lr: 0.05, weight_decay: 0.0,
        scheduler: cosine, feature_cache: CACHE, feature_cache_max_gb: MAX_GB,
        feature_cache_shared: SHARED, feature_cache_dir: CACHE_DIR}
"""


def _probe(cache: str, max_gb: float, cache_dir: Path | None = None) -> str:
    shared = "true" if cache_dir else "false"
    return (PROBE.replace("CACHE_DIR", str(cache_dir or "null")).replace("CACHE", cache)
            .replace("MAX_GB", str(max_gb)).replace("SHARED", shared))  # fmt: skip


def test_sharded_feature_cache_trains_the_heads_of_an_uncached_two_process_run(workdir):
    """Each process computes its shard of the features; the gathered cache (in memory, shard
    files on disk, or the shared cache, cold then warm) feeds the heads the same samples in the
    same order as images do."""
    uncached = _torchrun(workdir, 2, "probe_images", _probe("forbid", 4.0))
    memory = _torchrun(workdir, 2, "probe_memory", _probe("force", 4.0))
    disk = _torchrun(workdir, 2, "probe_disk", _probe("force", 0.0))
    store = workdir / "shared_feature_cache"
    cold = _torchrun(workdir, 2, "probe_shared_cold", _probe("force", 4.0, store))
    entries = [p for p in store.iterdir() if not p.name.startswith(".")]
    warm = _torchrun(workdir, 2, "probe_shared_warm", _probe("force", 0.0, store))
    assert sorted(p for p in store.iterdir() if not p.name.startswith(".")) == sorted(entries)
    expected = epoch_end_weights(uncached)
    heads = [k for k in expected if k.startswith("heads.")]
    for run in (memory, disk, cold, warm):
        weights = epoch_end_weights(run)
        for key in heads:
            assert torch.allclose(weights[key], expected[key], rtol=0, atol=1e-5), (run, key)
    shards = sorted(p.name for p in (disk / "feature_cache" / "train").iterdir())
    assert shards == ["shard_0_of_2", "shard_1_of_2"]
    assert len(entries) == 2  # train and validation, each with a shard per process
    assert all(sorted(p.name for p in e.glob("shard_*")) == shards for e in entries)
    for a, b in zip(records(uncached), records(memory)):
        assert a["val/digit/count"] == b["val/digit/count"]
        assert a["val/digit/accuracy"] == pytest.approx(b["val/digit/accuracy"], abs=1e-6)


AUTO_BATCH = """
import sys
import torch
from transferkit.cli import main
from transferkit.models.backbone import Backbone

original = Backbone.forward


def small_memory_on_rank_1(self, images):
    # Only the second process runs short of memory above 8 images.
    if torch.distributed.get_rank() == 1 and images.shape[0] > 8:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return original(self, images)


Backbone.forward = small_memory_on_rank_1
sys.exit(main(sys.argv[1:]))
"""


def test_auto_batch_size_takes_the_size_every_process_fits(workdir):
    script = workdir / "auto_batch_main.py"
    script.write_text(AUTO_BATCH)
    recipe = workdir / "auto_batch.yaml"
    recipe.write_text(_probe("forbid", 4.0).replace("train: {", "train: {auto_batch_size: true, "))
    output = workdir / "auto_batch"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port", str(free_port()), str(script), "train", str(recipe), "--output", str(output),
           "--set", "train.batch_size=32", "--set", "train.epochs=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "auto batch size: 8 per device, 4 accumulation steps" in result.stdout
    # 160 training rows in batches of 8: 10 per process, windows of 4 batches: 2 full windows
    # and the rest, which Accelerate steps at the end of the data. 3 steps on both processes.
    assert records(output)[-1]["step"] == 3


POISONED = """
name: ddp_nonfinite
seed: 0
model: {backbone: "timm:test_resnet", weights: none}
tasks:
  digit: {kind: multiclass}
  ink: {kind: regression, standardize: false}
data: {source: manifest, path: data/digits/transfer/poisoned_ddp.csv, val_split: null,
       image_size: 32, augment: none, num_workers: 0, max_samples: 128}
train: {epochs: 1, batch_size: 16, lr: 0.003, log_every: 3, checkpoint_every: 2,
        feature_cache: forbid, nonfinite: POLICY}
"""


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_every_process_takes_the_same_nonfinite_decision_without_reading_each_step(workdir, policy):
    """One process draws a row whose squared error overflows: the losses stay on the device
    (engine/tally.py), yet both processes skip the same steps (or stop at the same check point)
    and none waits for the other: a process that went another way would hang DDP's all-reduce
    or, having stepped on NaN gradients, pass NaN into every later step."""
    import csv

    source = workdir / "data" / "digits" / "transfer"
    rows = list(csv.DictReader((source / "manifest.csv").open()))[:128]
    for row in rows[30:34]:  # some land in the validation split, at least one in training
        row["ink"] = "1e30"  # finite, but its squared error overflows float32
    with (source / "poisoned_ddp.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    recipe = POISONED.replace("POLICY", policy)
    if policy == "stop":
        result = _torchrun_result(workdir, 2, "ddp_nonfinite_stop", recipe)
        assert result.returncode != 0
        assert "non-finite loss for task ink" in result.stderr, result.stderr[-3000:]
        return
    run_dir = _torchrun(workdir, 2, "ddp_nonfinite_skip", recipe)
    assert 1 <= records(run_dir)[-1]["skipped_steps"] <= 4
    weights = epoch_end_weights(run_dir)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
