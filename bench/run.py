"""transferkit's benchmark suite: `make bench` (or `.venv/bin/python -m bench.run`).

Writes `bench/results/results.json` and `bench/results/results.md`:
  (a) transferkit's training step against a hand-written PyTorch + Accelerate loop
  (b) a 10-epoch linear probe with the feature cache against without it
  (c) K tasks on one backbone against K single-task runs
  (d) freeze depth against step time and the activation memory autograd keeps
  (e) data pipeline images/s against training images/s
  (f) achieved FLOP/s of a full fine-tune step against measured matmul FLOP/s
`--quick` runs everything at toy sizes (used by the tests so the suite cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from transferkit.engine import train
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
    loop = TrainLoop(accelerator, model, optimizer, lr, {t: TaskSpec(t, "multiclass", 10) for t in tasks},
                     train_cfg, 0, PlainSum(accelerator, dict.fromkeys(tasks, 1.0)))  # fmt: skip
    loop.epoch(loader, {"epoch": 0, "batches": 0, "step": 0, "skipped_steps": 0})  # warm-up
    state = {"epoch": 1, "batches": 0, "step": 0, "skipped_steps": 0}
    start = time.perf_counter()
    loop.epoch(loader, state)
    return (time.perf_counter() - start) / state["step"]


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


def bench_feature_cache(cfg: dict, workdir: Path) -> dict:
    """(b) The same 10-epoch linear probe on the digits, with and without the feature cache."""
    from transferkit.digits import write_digits

    write_digits(workdir / "digits")
    times = {}
    for mode in ("forbid", "auto"):
        recipe = parse_recipe({
            "name": f"probe_{mode}", "model": {"backbone": cfg["backbone"]},
            "tasks": {"digit": {"kind": "multiclass"}},
            "data": {"source": "manifest", "path": str(workdir / "digits/transfer/manifest.csv"), "val_split": None,
                     "image_size": cfg["size"], "augment": "none", "max_samples": cfg["probe_samples"]},
            "schedule": {"phases": [{"from_epoch": 0, "freeze": "all"}]},
            "train": {"epochs": cfg["probe_epochs"], "batch_size": cfg["batch"], "feature_cache": mode, "keep_checkpoints": 1},
        })  # fmt: skip
        start = time.perf_counter()
        train(recipe, output=str(workdir / f"probe_{mode}"))
        times[mode] = time.perf_counter() - start
    return {"epochs": cfg["probe_epochs"], "uncached_s": times["forbid"], "cached_s": times["auto"],
            "speedup": times["forbid"] / times["auto"], "goal": ">= 20"}  # fmt: skip


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
    from transferkit.data import TaskImageDataset, build_transforms, collate, load_data
    from transferkit.digits import write_digits
    from transferkit.engine.setup import num_workers

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
    return {"workers": workers, "data_images_per_s": data_rate, "train_images_per_s": train_rate,
            "starved": data_rate < train_rate}  # fmt: skip


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


def _markdown(results: dict) -> str:
    a, b, c, e, f = (
        results[k]
        for k in ("a_overhead", "b_feature_cache", "c_multitask", "e_data_pipeline", "f_flops")
    )
    lines = [f"Device: {results['device']}; backbone {results['config']['backbone']} at {results['config']['size']} px, "
             f"batch {results['config']['batch']}; torch {results['torch']}.", "",
             "| benchmark | result | goal |", "|---|---|---|",
             f"| (a) step time, transferkit / hand-written loop | {a['overhead_ratio']:.3f} ({a['transferkit_s_per_step'] * 1e3:.1f} ms vs {a['handwritten_s_per_step'] * 1e3:.1f} ms) | <= 1.03 |",
             f"| (b) {b['epochs']}-epoch linear probe, uncached / cached time | {b['speedup']:.1f}x ({b['uncached_s']:.1f} s vs {b['cached_s']:.1f} s) | >= 20x |",
             f"| (c) {c['tasks']} single-task runs / one {c['tasks']}-task run | {c['cost_ratio_k_single_over_joint']:.2f}x | |",
             f"| (e) data pipeline vs training, images/s | {e['data_images_per_s']:.0f} vs {e['train_images_per_s']:.0f} ({'starved' if e['starved'] else 'not starved'}, {e['workers']} workers) | data >= training |",
             f"| (f) achieved / matmul FLOP/s | {f['achieved_gflops']:.1f} / {f['matmul_gflops']:.1f} GFLOP/s = {f['fraction_of_matmul']:.0%} | |",
             "", "(d) freeze depth:", "", "| frozen up to | trainable params | ms / step | saved activations (MB) |", "|---|---|---|---|"]  # fmt: skip
    for row in results["d_freeze_depth"]:
        lines.append(
            f"| {row['frozen_up_to']} | {row['trainable_params']:,} | {row['s_per_step'] * 1e3:.1f} | {row['saved_activations_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


FULL = {"backbone": "timm:resnet18", "size": 64, "batch": 32, "steps": 20, "repeats": 3,
        "probe_epochs": 10, "probe_samples": None, "matmul": 2048}  # fmt: skip
QUICK = {"backbone": "timm:test_resnet", "size": 32, "batch": 8, "steps": 3, "repeats": 1,
         "probe_epochs": 2, "probe_samples": 32, "matmul": 256}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Run every benchmark and write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (seconds), for tests")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    results = {"device": device, "torch": torch.__version__, "config": cfg}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for key, run in [("a_overhead", lambda: bench_overhead(cfg)), ("b_feature_cache", lambda: bench_feature_cache(cfg, work)),
                         ("c_multitask", lambda: bench_multitask(cfg)), ("d_freeze_depth", lambda: bench_freeze_depth(cfg)),
                         ("e_data_pipeline", lambda: bench_data_pipeline(cfg, work)), ("f_flops", lambda: bench_flops(cfg))]:  # fmt: skip
            print(f"running {key} ...", flush=True)
            results[key] = run()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(_markdown(results))
    print(_markdown(results))
    return results


if __name__ == "__main__":
    main()
