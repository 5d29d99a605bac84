"""transferkit's benchmark suite: `make bench` (or `.venv/bin/python -m bench.run`).

Writes `bench/results/results.json` and `bench/results/results.md`:
  (a) transferkit's training step against a hand-written PyTorch + Accelerate loop
  (b) a 10-epoch linear probe with the feature cache (inside the run; shared, cold and warm)
      against without it, and a sweep of 4 probe learning rates with and without the cache
  (c) K tasks on one backbone against K single-task runs
  (d) freeze depth against step time and the activation memory autograd keeps
  (e) data pipeline images/s against training images/s
  (f) achieved FLOP/s of a full fine-tune step against measured matmul FLOP/s
  (g) on a CUDA GPU only (skipped, with the reason, without one): images/s of transferkit's
      training step against timm's train.py (`--timm-train PATH` or $TIMM_TRAIN, a timm
      checkout), or a hand-written timm-style loop without it, at the same model, batch,
      resolution and precision; and achieved FLOP/s against the GPU's bf16 peak
`--quick` runs everything at toy sizes (used by the tests so the suite cannot rot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from transferkit.engine import TrainerState, train
from transferkit.engine.loop import TrainLoop
from transferkit.engine.optim import build_lr_scheduler, build_optimizer
from transferkit.engine.schedule import FreezeSchedule
from transferkit.engine.strategies import PlainSum
from transferkit.models import MultiTaskModel, TaskSpec, create_backbone
from transferkit.recipes import parse_recipe
from transferkit.recipes.schema import PhaseSection

HERE = Path(__file__).resolve().parent


class Synthetic(Dataset):
    """Random images with labels for K tasks, already in transferkit's batch format."""

    def __init__(self, n: int, size: int, tasks: list[str]) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=generator)
        self.labels = {t: torch.randint(0, 10, (n,), generator=generator) for t in tasks}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "targets": {t: v[i] for t, v in self.labels.items()},
                "mask": {t: torch.tensor(True) for t in self.labels}, "index": i}  # fmt: skip


def _model(cfg: dict, tasks: list[str]) -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = create_backbone(cfg["backbone"])
    return MultiTaskModel(backbone, [TaskSpec(t, "multiclass", 10) for t in tasks])


def _train_cfg(epochs: int = 1):
    recipe = parse_recipe({"model": {"backbone": "timm:resnet18"}, "tasks": {"a": {"kind": "multiclass"}},
                           "data": {"source": "manifest", "path": "x.csv"}, "train": {"epochs": epochs, "scheduler": "constant"}})  # fmt: skip
    return recipe.train


def _transferkit_steps(cfg: dict, tasks: list[str], loader_items: int) -> float:
    """Seconds per step of transferkit's training loop (TrainLoop) over synthetic batches."""
    from transferkit.data import collate

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = _model(cfg, tasks)
    train_cfg = _train_cfg()
    schedule = FreezeSchedule(model.backbone, [PhaseSection()])
    optimizer = build_optimizer(model, train_cfg)
    loader = DataLoader(
        Synthetic(loader_items, cfg["size"], tasks), batch_size=cfg["batch"], collate_fn=collate
    )
    lr = build_lr_scheduler(optimizer, train_cfg, schedule, len(loader))
    model, optimizer, loader, lr = accelerator.prepare(model, optimizer, loader, lr)
    loop = TrainLoop(accelerator=accelerator, model=model, optimizer=optimizer, lr_scheduler=lr,
                     tasks={t: TaskSpec(t, "multiclass", 10) for t in tasks}, cfg=train_cfg, seed=0,
                     strategy=PlainSum(accelerator, dict.fromkeys(tasks, 1.0)))  # fmt: skip
    loop.epoch(loader, TrainerState())  # warm-up
    state = TrainerState(epoch=1)
    start = time.perf_counter()
    loop.epoch(loader, state)
    return (time.perf_counter() - start) / state.step


def _handwritten_steps(cfg: dict, tasks: list[str], loader_items: int) -> float:
    """Seconds per step of the loop a user would write with PyTorch + Accelerate."""
    from transferkit.data import collate

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = _model(cfg, tasks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loader = DataLoader(
        Synthetic(loader_items, cfg["size"], tasks), batch_size=cfg["batch"], collate_fn=collate
    )
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, loader, lr = accelerator.prepare(model, optimizer, loader, lr)
    model.train()
    for _epoch in range(2):  # a warm-up epoch, then the timed one
        start, steps = time.perf_counter(), 0
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(batch["image"])
                loss = sum(F.cross_entropy(outputs[t], batch["targets"][t]) for t in tasks)
                accelerator.backward(loss)
                optimizer.step()
                lr.step()
                optimizer.zero_grad(set_to_none=True)
            steps += 1
    return (time.perf_counter() - start) / steps


def bench_overhead(cfg: dict) -> dict:
    """(a) Alternate the two loops and compare median seconds per step."""
    items = cfg["batch"] * cfg["steps"]
    ours, theirs = [], []
    for _ in range(cfg["repeats"]):
        theirs.append(_handwritten_steps(cfg, ["a"], items))
        ours.append(_transferkit_steps(cfg, ["a"], items))
    ratio = statistics.median(ours) / statistics.median(theirs)
    return {"transferkit_s_per_step": statistics.median(ours), "handwritten_s_per_step": statistics.median(theirs),
            "overhead_ratio": ratio, "goal": "<= 1.03"}  # fmt: skip


def _probe_seconds(cfg: dict, workdir: Path, name: str, mode: str, shared: bool,
                   lr: float = 1e-3) -> float:  # fmt: skip
    """Wall time of one linear probe on the digits, set-up and all, as `train` runs it."""
    recipe = parse_recipe({
        "name": name, "model": {"backbone": cfg["backbone"]},
        "tasks": {"digit": {"kind": "multiclass"}},
        "data": {"source": "manifest", "path": str(workdir / "digits/transfer/manifest.csv"), "val_split": None,
                 "image_size": cfg["size"], "augment": "none", "max_samples": cfg["probe_samples"]},
        "schedule": {"phases": [{"from_epoch": 0, "freeze": "all"}]},
        "train": {"epochs": cfg["probe_epochs"], "batch_size": cfg["batch"], "feature_cache": mode, "lr": lr,
                  "keep_checkpoints": 1, "feature_cache_shared": shared,
                  "feature_cache_dir": str(workdir / "feature_cache")},
    })  # fmt: skip
    start = time.perf_counter()
    train(recipe, output=str(workdir / name))
    return time.perf_counter() - start


def bench_feature_cache(cfg: dict, workdir: Path) -> dict:
    """(b) The same 10-epoch linear probe on the digits: without the feature cache, with the
    cache inside the run, and with the shared cache cold (computes and stores the features)
    and warm (reads them). Then a sweep of 4 probe learning rates, run one after the other in
    this process: 4 uncached runs, and the same 4 with the shared cache cold and warm."""
    from transferkit.demo.digits import write_digits

    write_digits(workdir / "digits")
    probe = partial(_probe_seconds, cfg, workdir)
    uncached = probe("probe_forbid", "forbid", False)
    in_run = probe("probe_in_run", "auto", False)
    cold = probe("probe_cold", "auto", True)
    warm = probe("probe_warm", "auto", True)
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    sweep_uncached = sum(probe(f"sweep_forbid_{lr}", "forbid", False, lr) for lr in lrs)
    shutil.rmtree(workdir / "feature_cache")  # the sweep starts from an empty shared cache
    sweep_cold = sum(probe(f"sweep_cold_{lr}", "auto", True, lr) for lr in lrs)
    sweep_warm = sum(probe(f"sweep_warm_{lr}", "auto", True, lr) for lr in lrs)
    return {"epochs": cfg["probe_epochs"], "uncached_s": uncached, "cached_s": in_run,
            "speedup": uncached / in_run, "shared_cold_s": cold, "shared_warm_s": warm,
            "warm_speedup": uncached / warm, "goal": ">= 20 (warm shared cache)", "sweep_lrs": lrs,
            "sweep_uncached_s": sweep_uncached, "sweep_cold_s": sweep_cold, "sweep_warm_s": sweep_warm,
            "sweep_cold_speedup": sweep_uncached / sweep_cold,
            "sweep_warm_speedup": sweep_uncached / sweep_warm}  # fmt: skip


def bench_multitask(cfg: dict) -> dict:
    """(c) One backbone with K heads against K single-task runs, per step."""
    k = 3
    items = cfg["batch"] * cfg["steps"]
    tasks = [f"t{i}" for i in range(k)]
    joint = statistics.median(_transferkit_steps(cfg, tasks, items) for _ in range(cfg["repeats"]))
    single = statistics.median(
        _transferkit_steps(cfg, ["t0"], items) for _ in range(cfg["repeats"])
    )
    return {"tasks": k, "joint_s_per_step": joint, "single_s_per_step": single,
            "cost_ratio_k_single_over_joint": k * single / joint}  # fmt: skip


def bench_freeze_depth(cfg: dict) -> list[dict]:
    """(d) Step time and bytes autograd saves for backward, freezing up to each group."""
    rows = []
    model = _model(cfg, ["a"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"])
    labels = torch.randint(0, 10, (cfg["batch"],))
    names = model.backbone.group_names
    for depth in range(-1, len(names)):
        model.backbone.freeze("none" if depth < 0 else f"up_to:{depth}")
        model.train()
        saved = [0]

        def pack(tensor, saved=saved):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        times = []
        for _ in range(cfg["repeats"] + 1):
            saved[0] = 0
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = F.cross_entropy(model(images)["a"], labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"frozen_up_to": "none" if depth < 0 else names[depth], "trainable_params": trainable,
                     "s_per_step": statistics.median(times[1:]), "saved_activations_mb": saved[0] / 2**20})  # fmt: skip
    return rows


def bench_data_pipeline(cfg: dict, workdir: Path) -> dict:
    """(e) Images/s the data pipeline delivers against images/s a training step consumes."""
    from transferkit.data import TaskImageDataset, build_transforms, collate, load_data, num_workers
    from transferkit.demo.digits import write_digits

    write_digits(workdir / "digits")
    recipe = parse_recipe({"model": {"backbone": cfg["backbone"]}, "tasks": {"digit": {"kind": "multiclass"}},
                           "data": {"source": "manifest", "path": str(workdir / "digits/transfer/manifest.csv"), "val_split": None}})  # fmt: skip
    data = load_data(recipe.data, recipe.tasks, 0)
    backbone = create_backbone(cfg["backbone"])
    dataset = TaskImageDataset(
        data.splits["train"],
        data.tasks,
        build_transforms(backbone.data_config, True, "light", cfg["size"]),
    )
    workers = num_workers(None)
    loader = DataLoader(dataset, batch_size=cfg["batch"], num_workers=workers, collate_fn=collate)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["index"])
    data_rate = seen / (time.perf_counter() - start)
    step = _transferkit_steps(cfg, ["a"], cfg["batch"] * cfg["steps"])
    train_rate = cfg["batch"] / step
    from bench.loaders import bench_loaders

    return {"workers": workers, "data_images_per_s": data_rate, "train_images_per_s": train_rate,
            "starved": data_rate < train_rate, "loaders": bench_loaders(cfg, workdir)}  # fmt: skip


def bench_flops(cfg: dict) -> dict:
    """(f) FLOPs of one fwd+bwd step (counted) over its time, against a large matmul's FLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(cfg, ["a"])
    images = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"])
    labels = torch.randint(0, 10, (cfg["batch"],))

    def step():
        F.cross_entropy(model(images)["a"], labels).backward()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(cfg["repeats"] + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    achieved = flops / statistics.median(times[1:])
    n = cfg["matmul"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(cfg["repeats"]):
        a @ b
    peak = 2 * n**3 * cfg["repeats"] / (time.perf_counter() - start)
    return {"step_gflop": flops / 1e9, "achieved_gflops": achieved / 1e9, "matmul_gflops": peak / 1e9,
            "fraction_of_matmul": achieved / peak}  # fmt: skip


# Dense bf16 peak (TFLOP/s, no sparsity) by `torch.cuda.get_device_name()`, from NVIDIA's data
# sheets. Any other name (H100 PCIe or NVL, a MIG slice, ...) gets the achieved value only.
BF16_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM
    "NVIDIA H200": 989.0,  # H200 SXM
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
}
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _device_batches(cfg: dict, device: str) -> tuple[list[dict], list[dict]]:
    """Warm-up and timed batches, already on the device in transferkit's batch format (four
    distinct batches, reused), so that neither loop's timing includes data loading."""
    generator = torch.Generator().manual_seed(0)
    distinct = []
    for _ in range(4):
        images = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=generator)
        labels = torch.randint(0, 10, (cfg["batch"],), generator=generator)
        distinct.append({"image": images.to(device), "targets": {"a": labels.to(device)},
                         "mask": {"a": torch.ones(cfg["batch"], dtype=torch.bool, device=device)},
                         "index": torch.arange(cfg["batch"])})  # fmt: skip
    batches = [distinct[i % 4] for i in range(cfg["warmup"] + cfg["steps"])]
    return batches[: cfg["warmup"]], batches[cfg["warmup"] :]


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _gpu_transferkit_steps(cfg: dict, device: str) -> float:
    """Seconds per step of transferkit's TrainLoop, as in (a), with the run's precision and
    memory format (Accelerate's autocast, channels_last weights and inputs)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # another mixed precision than the sections before
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=cfg["precision"])
    model = _model(cfg, ["a"])
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    train_cfg = dataclasses.replace(_train_cfg(), channels_last=cfg["channels_last"],
                                    mixed_precision=cfg["precision"])  # fmt: skip
    schedule = FreezeSchedule(model.backbone, [PhaseSection()])
    optimizer = build_optimizer(model, train_cfg)
    warmup, timed = _device_batches(cfg, device)
    lr = build_lr_scheduler(optimizer, train_cfg, schedule, len(timed))
    model, optimizer, lr = accelerator.prepare(model, optimizer, lr)
    loop = TrainLoop(accelerator=accelerator, model=model, optimizer=optimizer, lr_scheduler=lr,
                     tasks={"a": TaskSpec("a", "multiclass", 10)}, cfg=train_cfg, seed=0,
                     strategy=PlainSum(accelerator, {"a": 1.0}))  # fmt: skip
    loop.epoch(warmup, TrainerState())
    state = TrainerState(epoch=1)
    _synchronize(device)
    start = time.perf_counter()
    loop.epoch(timed, state)
    _synchronize(device)
    seconds = (time.perf_counter() - start) / state.step
    AcceleratorState._reset_state()
    return seconds


def _timm_style_steps(cfg: dict, device: str) -> float:
    """Seconds per step of a hand-written loop shaped like timm's train.py step: timm's
    `create_model` and `create_optimizer_v2`, autocast, `loss.backward()` (through a
    GradScaler in fp16), `optimizer.step()`, and the loss read every step as train.py logs it.
    Not timm's train.py (that is `--timm-train`)."""
    import timm
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = timm.create_model(cfg["backbone"].removeprefix("timm:"), num_classes=10).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    dtype = _AUTOCAST.get(cfg["precision"])
    scaler = torch.amp.GradScaler(device) if cfg["precision"] == "fp16" else None
    model.train()

    def run(batches: list[dict]) -> None:
        for batch in batches:
            images = batch["image"]
            if cfg["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(images), batch["targets"]["a"])
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()

    warmup, timed = _device_batches(cfg, device)
    run(warmup)
    _synchronize(device)
    start = time.perf_counter()
    run(timed)
    _synchronize(device)
    return (time.perf_counter() - start) / len(timed)


def _timm_train_py_steps(cfg: dict, timm_train: str, device: str, workdir: Path) -> dict:
    """Seconds per update of timm's own train.py, from its log (`--log-interval 1
    --synchronize-step`: one line per update with its images/s, data loading included). It
    trains on a folder of random JPEG images at the benchmark's resolution."""
    from PIL import Image

    script = Path(timm_train)
    script = script / "train.py" if script.is_dir() else script
    if not script.is_file():
        raise FileNotFoundError(f"--timm-train {timm_train}: no train.py there (a timm checkout)")
    folder = workdir / "timm_images" / "train"
    generator = torch.Generator().manual_seed(0)
    count = cfg["batch"] * (cfg["warmup"] + cfg["steps"])
    for i in range(count):
        (folder / str(i % 10)).mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (cfg["size"], cfg["size"], 3), generator=generator)
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / str(i % 10) / f"{i}.jpg")
    from transferkit.data import num_workers

    command = [sys.executable, str(script), "--data-dir", str(folder.parent), "--train-split", "train",
               "--val-split", "train", "--model", cfg["backbone"].removeprefix("timm:"), "--num-classes", "10",
               "--input-size", "3", str(cfg["size"]), str(cfg["size"]), "--crop-pct", "1.0", "-b", str(cfg["batch"]),
               "--epochs", "1", "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--warmup-epochs", "0",
               "--no-aug", "--smoothing", "0", "--log-interval", "1", "--synchronize-step", "--seed", "0",
               "--workers", str(max(num_workers(None), 1)), "--pin-mem", "--device", device,
               "--output", str(workdir / "timm_output"), "--checkpoint-hist", "1"]  # fmt: skip
    if cfg["precision"] != "no":
        command += [
            "--amp",
            "--amp-dtype",
            {"bf16": "bfloat16", "fp16": "float16"}[cfg["precision"]],
        ]
    if cfg["channels_last"]:
        command.append("--channels-last")
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=3600)
    log = result.stdout + result.stderr
    # "Time: 0.045s, 2844.44/s  (...)": the update's time, rounded to 1 ms, and its images/s.
    rates = [float(r) for r in re.findall(r"Time: [0-9.]+s,\s+([0-9.]+)/s", log)]
    data = [float(t) for t in re.findall(r"Data: ([0-9.]+) \(", log)]
    if result.returncode != 0 or len(rates) <= cfg["warmup"]:
        raise RuntimeError(f"timm's train.py failed (exit {result.returncode}): {log[-2000:]}")
    return {"s_per_step": cfg["batch"] / statistics.median(rates[cfg["warmup"] :]),
            "data_s_per_step": statistics.median(data[cfg["warmup"] :]) if data else None,
            "command": " ".join(command)}  # fmt: skip


def _step_flops(cfg: dict, device: str) -> int:
    """FLOPs of one forward and backward pass of the benchmark's model (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(cfg, ["a"]).to(device)
    (batch,), _ = _device_batches({**cfg, "warmup": 1, "steps": 0}, device)
    dtype = _AUTOCAST.get(cfg["precision"])
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(batch["image"])["a"], batch["targets"]["a"])
        loss.backward()
    return counter.get_total_flops()


def bench_gpu(cfg: dict, timm_train: str | None, workdir: Path, device: str = "cuda") -> dict:
    """(g) transferkit's step against timm's train.py (or a timm-style loop), and FLOP/s."""
    if device == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA GPU here (torch.cuda.is_available() is False)"
        print(f"(g) GPU benchmark skipped: {reason}", flush=True)
        return {"skipped": reason}
    name = torch.cuda.get_device_name() if device == "cuda" else device
    ours = statistics.median(_gpu_transferkit_steps(cfg, device) for _ in range(cfg["repeats"]))
    if timm_train:
        anchor = f"timm's train.py ({timm_train})"
        try:
            timm_run = _timm_train_py_steps(cfg, timm_train, device, workdir)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"(g) {anchor} did not run: {err}", flush=True)  # keep the other results
            timm_run = {"s_per_step": math.nan, "data_s_per_step": None}
        theirs, data_s = timm_run["s_per_step"], timm_run["data_s_per_step"]
    else:
        theirs = statistics.median(_timm_style_steps(cfg, device) for _ in range(cfg["repeats"]))
        anchor = "hand-written timm-style loop (no --timm-train given; not timm's train.py)"
        data_s = None
    flops = _step_flops(cfg, device)
    achieved = flops / ours / 1e12
    peak = BF16_PEAK_TFLOPS.get(name)
    return {"device": name, "backbone": cfg["backbone"], "size": cfg["size"], "batch": cfg["batch"],
            "precision": cfg["precision"], "channels_last": cfg["channels_last"], "anchor": anchor,
            "transferkit_images_per_s": cfg["batch"] / ours, "anchor_images_per_s": cfg["batch"] / theirs,
            "ratio_transferkit_over_anchor": theirs / ours, "anchor_data_s_per_step": data_s,
            "step_tflop": flops / 1e12, "achieved_tflops": achieved, "peak_bf16_tflops": peak,
            "fraction_of_peak": achieved / peak if peak else None}  # fmt: skip


def _gpu_markdown(g: dict) -> list[str]:
    if "skipped" in g:
        return ["", f"(g) GPU: skipped, {g['skipped']}."]
    peak = (f" = {g['fraction_of_peak']:.1%} of the {g['peak_bf16_tflops']:.0f} TFLOP/s bf16 peak"
            if g["peak_bf16_tflops"] else " (no bf16 peak on record for this GPU)")  # fmt: skip
    data = (f"; train.py waited {g['anchor_data_s_per_step'] * 1e3:.1f} ms a step for data"
            if g["anchor_data_s_per_step"] is not None else "")  # fmt: skip
    return ["", f"(g) GPU: {g['device']}; {g['backbone']} at {g['size']} px, batch {g['batch']}, {g['precision']}, "
            f"channels_last {g['channels_last']}.", "", "| benchmark | result |", "|---|---|",
            f"| training images/s, transferkit / {g['anchor']} | {g['transferkit_images_per_s']:.0f} / "
            f"{g['anchor_images_per_s']:.0f} = {g['ratio_transferkit_over_anchor']:.3f}{data} |",
            f"| achieved FLOP/s of transferkit's step (fwd+bwd, {g['step_tflop']:.3f} TFLOP counted) | "
            f"{g['achieved_tflops']:.1f} TFLOP/s{peak} |"]  # fmt: skip


def _markdown(results: dict) -> str:
    a, b, c, e, f = (
        results[k]
        for k in ("a_overhead", "b_feature_cache", "c_multitask", "e_data_pipeline", "f_flops")
    )
    lines = [f"Device: {results['device']}; backbone {results['config']['backbone']} at {results['config']['size']} px, "
             f"batch {results['config']['batch']}; torch {results['torch']}.", "",
             "| benchmark | result | goal |", "|---|---|---|",
             f"| (a) step time, transferkit / hand-written loop | {a['overhead_ratio']:.3f} ({a['transferkit_s_per_step'] * 1e3:.1f} ms vs {a['handwritten_s_per_step'] * 1e3:.1f} ms) | <= 1.03 |",
             f"| (b) {b['epochs']}-epoch linear probe, uncached / warm shared cache | {b['warm_speedup']:.1f}x ({b['uncached_s']:.1f} s vs {b['shared_warm_s']:.2f} s) | >= 20x |",
             f"| (b) the same, uncached / cache inside the run; / shared cache cold | {b['speedup']:.1f}x ({b['cached_s']:.1f} s); {b['uncached_s'] / b['shared_cold_s']:.1f}x ({b['shared_cold_s']:.1f} s) | |",
             f"| (b) sweep of {len(b['sweep_lrs'])} probe lrs, uncached / shared cache cold; / warm | {b['sweep_cold_speedup']:.1f}x ({b['sweep_uncached_s']:.1f} s vs {b['sweep_cold_s']:.1f} s); {b['sweep_warm_speedup']:.1f}x ({b['sweep_warm_s']:.1f} s) | |",
             f"| (c) {c['tasks']} single-task runs / one {c['tasks']}-task run | {c['cost_ratio_k_single_over_joint']:.2f}x | |",
             f"| (e) data pipeline vs training, images/s | {e['data_images_per_s']:.0f} vs {e['train_images_per_s']:.0f} ({'starved' if e['starved'] else 'not starved'}, {e['workers']} workers) | data >= training |",
             *[f"| (e) {name}: transferkit's loader / timm's create_loader, images/s | {row['ratio']:.2f} ({row['transferkit_images_per_s']:.0f} vs {row['timm_images_per_s']:.0f}, {e['loaders']['workers']} workers) | >= 0.95 |"
               for name, row in e.get("loaders", {}).get("rows", {}).items()],
             f"| (f) achieved / matmul FLOP/s | {f['achieved_gflops']:.1f} / {f['matmul_gflops']:.1f} GFLOP/s = {f['fraction_of_matmul']:.0%} | |",
             "", "(d) freeze depth:", "", "| frozen up to | trainable params | ms / step | saved activations (MB) |", "|---|---|---|---|"]  # fmt: skip
    for row in results["d_freeze_depth"]:
        lines.append(
            f"| {row['frozen_up_to']} | {row['trainable_params']:,} | {row['s_per_step'] * 1e3:.1f} | {row['saved_activations_mb']:.1f} |"
        )
    if "g_gpu" in results:
        lines += _gpu_markdown(results["g_gpu"])
    return "\n".join(lines) + "\n"


FULL = {"backbone": "timm:resnet18", "size": 64, "batch": 32, "steps": 20, "repeats": 3,
        "probe_epochs": 10, "probe_samples": None, "matmul": 2048, "loader_images": 1000}  # fmt: skip
QUICK = {"backbone": "timm:test_resnet", "size": 32, "batch": 8, "steps": 3, "repeats": 1,
         "probe_epochs": 2, "probe_samples": 32, "matmul": 256, "loader_images": 48}  # fmt: skip
# (g): ResNet-50 at ImageNet's resolution in bf16 with channels_last, as timm trains it on GPUs.
GPU_FULL = {"backbone": "timm:resnet50", "size": 224, "batch": 128, "warmup": 10, "steps": 30,
            "repeats": 3, "precision": "bf16", "channels_last": True}  # fmt: skip
GPU_QUICK = {"backbone": "timm:test_resnet", "size": 32, "batch": 8, "warmup": 2, "steps": 3,
             "repeats": 1, "precision": "bf16", "channels_last": True}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Run every benchmark and write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (seconds), for tests")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--only", metavar="SECTION", help="run one section (e.g. b_feature_cache) "
                        "and update it in the existing results.json")  # fmt: skip
    parser.add_argument("--timm-train", default=os.environ.get("TIMM_TRAIN"), metavar="PATH",
                        help="(g) a timm repository checkout (or its train.py) to time timm's "
                        "train.py against; default $TIMM_TRAIN, else a hand-written timm-style loop")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    gpu_cfg = GPU_QUICK if args.quick else GPU_FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    results = {"device": device, "torch": torch.__version__, "config": cfg}
    if args.only:
        results = {**json.loads((out / "results.json").read_text()), **results}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for key, run in [("a_overhead", lambda: bench_overhead(cfg)), ("b_feature_cache", lambda: bench_feature_cache(cfg, work)),
                         ("c_multitask", lambda: bench_multitask(cfg)), ("d_freeze_depth", lambda: bench_freeze_depth(cfg)),
                         ("e_data_pipeline", lambda: bench_data_pipeline(cfg, work)), ("f_flops", lambda: bench_flops(cfg)),
                         ("g_gpu", lambda: bench_gpu(gpu_cfg, args.timm_train, work))]:  # fmt: skip
            if args.only and key != args.only:
                continue
            print(f"running {key} ...", flush=True)
            results[key] = run()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results))
    print(_markdown(results))
    return results


if __name__ == "__main__":
    main()
