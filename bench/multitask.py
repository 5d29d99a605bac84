"""Multi-task methods compared: `make bench-multitask` (or `.venv/bin/python -m bench.multitask`).

Trains every method of `transferkit.balancing.METHODS`, single-task baselines and a small grid of
static task weights on two digit datasets, over several seeds, and writes
`bench/results/multitask.json` and `bench/results/multitask.md`:
  quickstart: the transfer digits 5-9 (digit: multiclass, parity: binary, ink: regression);
  overlaid:   two overlaid digits per image (left, right: multiclass), conflicting tasks.
Each method is scored by Δm%, the mean relative change of the task metrics against the
single-task runs of the same seed (lower is better), and by its training time per step against
equal weighting (`sum`). `--quick` runs a few methods at toy sizes (used by the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from transferkit.runs import delta_m, seconds_per_step

HERE = Path(__file__).resolve().parent
BACKBONE = "timm:test_resnet"
SEEDS = 3
QUICK_METHODS = ["sum", "uw", "upgrad", "gradnorm"]
FULL = {"epochs": 6, "max_samples": 600, "batch": 64, "num_workers": 0}
QUICK = {"epochs": 2, "max_samples": 48, "batch": 16, "num_workers": 0}
TRAIN = {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.01}

# name -> tasks (recipe sections, first = monitored), static-weight grid, its --quick subset.
DATASETS = {
    "quickstart": {
        "tasks": {
            "digit": {"kind": "multiclass"},
            "parity": {"kind": "binary", "classes": ["even", "odd"]},
            "ink": {"kind": "regression"},
        },
        "grid": [("ink", 0.25), ("ink", 0.5), ("ink", 2.0), ("parity", 0.5), ("parity", 2.0)],
        "quick_grid": [("ink", 0.5)],
    },
    "overlaid": {
        "tasks": {"left": {"kind": "multiclass"}, "right": {"kind": "multiclass"}},
        "grid": [("right", 0.25), ("right", 0.5), ("right", 2.0), ("right", 4.0)],
        "quick_grid": [("right", 0.5)],
    },
}


def _write_data(folder: Path) -> dict[str, str]:
    """The two datasets' manifests, written under `folder`."""
    from transferkit.demo.digits import write_digits, write_overlaid_digits

    write_digits(folder / "digits")
    write_overlaid_digits(folder / "overlaid")
    return {
        "quickstart": str(folder / "digits" / "transfer" / "manifest.csv"),
        "overlaid": str(folder / "overlaid" / "manifest.csv"),
    }


def _regression(dataset: str, task: str) -> bool:
    return DATASETS[dataset]["tasks"][task]["kind"] == "regression"


def _metric_key(dataset: str, task: str) -> str:
    return f"val/{task}/{'mae' if _regression(dataset, task) else 'accuracy'}"


def _plan(methods: list[str], seeds: list[int], quick: bool) -> list[dict]:
    """Every run: per dataset and seed, the single-task baselines, each method, the grid."""
    from transferkit.balancing import METHODS

    runs = []
    for dataset, spec in DATASETS.items():
        tasks = list(spec["tasks"])
        for seed in seeds:
            base = {"dataset": dataset, "seed": seed, "weights": {}}
            for task in tasks:
                runs.append(
                    {
                        **base,
                        "name": f"single {task}",
                        "kind": "single-task",
                        "family": "baseline",
                        "method": "sum",
                        "tasks": [task],
                    }
                )
            for method in methods:
                info = METHODS[method]
                runs.append(
                    {
                        **base,
                        "name": method,
                        "kind": info.kind,
                        "family": info.family,
                        "method": method,
                        "tasks": tasks,
                    }
                )
            for task, weight in spec["quick_grid" if quick else "grid"]:
                runs.append(
                    {
                        **base,
                        "name": f"static {task}={weight:g}",
                        "kind": "static",
                        "family": "static weights",
                        "method": "sum",
                        "tasks": tasks,
                        "weights": {task: weight},
                    }
                )
    return runs


def _recipe(run: dict, path: str, cfg: dict):
    from transferkit.recipes import parse_recipe

    sections = DATASETS[run["dataset"]]["tasks"]
    tasks = {
        t: {**sections[t], **({"weight": run["weights"][t]} if t in run["weights"] else {})}
        for t in run["tasks"]
    }
    first = run["tasks"][0]
    return parse_recipe(
        {
            "name": f"{run['dataset']}_{run['name'].replace(' ', '_')}_{run['seed']}",
            "seed": run["seed"],
            "model": {"backbone": BACKBONE},
            "tasks": tasks,
            "data": {
                "source": "manifest",
                "path": path,
                "val_split": None,
                "val_fraction": 0.3,
                "image_size": 32,
                "augment": "none",
                "max_samples": cfg["max_samples"],
                "num_workers": cfg["num_workers"],
            },
            "schedule": {"phases": [{"from_epoch": 0, "freeze": "none"}]},
            "train": {
                "epochs": cfg["epochs"],
                "batch_size": cfg["batch"],
                **TRAIN,
                "monitor": _metric_key(run["dataset"], first),
                "monitor_mode": "min" if _regression(run["dataset"], first) else "max",
                "keep_checkpoints": 1,
            },
            "multitask": {"method": run["method"]},
        }
    )


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _train_one(run: dict, path: str, cfg: dict, workdir: Path) -> dict:
    """Train one run (its output silenced) and read its last epoch; errors are recorded."""
    from transferkit.engine import train
    from transferkit.rundir.folder import RunDir

    result = {
        k: run[k]
        for k in ("dataset", "name", "kind", "family", "method", "seed", "tasks", "weights")
    }
    run_dir = workdir / "runs" / f"{run['dataset']}_{run['name'].replace(' ', '_')}_{run['seed']}"
    start = time.perf_counter()
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            train(_recipe(run, path, cfg), output=str(run_dir))
        records = RunDir(run_dir).records()
        last = records[-1]
        result.update(
            error=None,
            epochs=len(records),
            steps=last["step"],
            metrics={t: _finite(last.get(_metric_key(run["dataset"], t))) for t in run["tasks"]},
            step_s=seconds_per_step(run_dir),
            balance={k: v for k, v in last.items() if k.startswith("mtl/")},
        )
    except Exception as err:  # a failing method must not stop the benchmark
        result.update(
            error=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(),
            output_tail=output.getvalue()[-2000:],
        )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    result["seconds"] = time.perf_counter() - start
    return result


def _delta_m(metrics: dict, baselines: dict, dataset: str) -> float | None:
    """Δm% against the single-task runs (see `transferkit.runs.delta_m`)."""
    if not metrics or any(metrics[t] is None or not baselines.get(t) for t in metrics):
        return None

    def named(values: dict) -> dict:
        return {
            f"{t}/{'mae' if _regression(dataset, t) else 'accuracy'}": values[t] for t in metrics
        }

    return delta_m(named(metrics), named(baselines))


def _score(results: list[dict]) -> None:
    """Add Δm% (against the same seed's single-task runs) and step time relative to `sum`."""
    baselines: dict[tuple, dict] = {}
    ew: dict[tuple, float | None] = {}
    for r in results:
        key = (r["dataset"], r["seed"])
        if r["error"] is None and r["kind"] == "single-task":
            baselines.setdefault(key, {})[r["tasks"][0]] = r["metrics"][r["tasks"][0]]
        if r["error"] is None and r["name"] == "sum":
            ew[key] = r["step_s"]
    for r in results:
        key = (r["dataset"], r["seed"])
        if r["error"] is not None:
            r["delta_m"] = r["step_vs_ew"] = None
            continue
        r["delta_m"] = _delta_m(r["metrics"], baselines.get(key, {}), r["dataset"])
        reference = ew.get(key)
        r["step_vs_ew"] = r["step_s"] / reference if reference and r["step_s"] else None


def _stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _aggregate(results: list[dict]) -> dict:
    """Per dataset, per row (method, static point, single task): mean and std over seeds."""
    out: dict[str, list] = {}
    for dataset in DATASETS:
        rows: dict[str, list] = {}
        for r in results:
            if r["dataset"] == dataset:
                rows.setdefault(r["name"], []).append(r)
        table = []
        for name, runs in rows.items():
            ok = [r for r in runs if r["error"] is None]
            first = runs[0]
            table.append(
                {
                    "name": name,
                    "kind": first["kind"],
                    "family": first["family"],
                    "method": first["method"],
                    "weights": first["weights"],
                    "tasks": first["tasks"],
                    "seeds": [r["seed"] for r in runs],
                    "failed": len(runs) - len(ok),
                    "errors": {str(r["seed"]): r["error"] for r in runs if r["error"] is not None},
                    "metrics": {t: _stats([r["metrics"][t] for r in ok]) for t in first["tasks"]},
                    "delta_m": _stats([r["delta_m"] for r in ok]),
                    "step_vs_ew": _stats([r["step_vs_ew"] for r in ok]),
                    "seconds": _stats([r["seconds"] for r in runs]),
                }
            )
        table.sort(
            key=lambda row: (
                row["delta_m"]["mean"] is None,
                row["delta_m"]["mean"] or 0.0,
                row["kind"] == "single-task",
            )
        )
        out[dataset] = table
    return out


def _fmt(stats: dict, digits: int, suffix: str = "") -> str:
    if stats["mean"] is None:
        return "—"
    text = f"{stats['mean']:.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {stats['std']:.{digits}f}"
    return text + suffix


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        "# Multi-task methods: Δm% and step time",
        "",
        f"`python -m bench.multitask{' --quick' if s['quick'] else ''}`, {report['date']}, "
        f"{report['wall_s'] / 60:.1f} min in all. Seeds {', '.join(map(str, s['seeds']))} "
        f"(`recipe.seed`: initialization, data split and order). Backbone `{s['backbone']}` from "
        f"scratch (no pretrained weights), one phase `freeze: none`; {s['epochs']} epochs, "
        f"`data.max_samples` {s['max_samples']} per split (70/30 train/validation split first), "
        f"{s['image_size']} px, no augmentation, batch {s['batch']}, AdamW lr {s['lr']}, "
        f"weight decay {s['weight_decay']}, cosine schedule. Device: {m['device']}, "
        f"{m['torch_threads']} torch thread(s), torch {m['torch']}.",
        "",
        "- Task metrics are validation accuracy (↑) or MAE (↓) at the last epoch, mean ± std "
        "over seeds.",
        "- Δm% = 100/T · Σ_t (−1)^h_t (M_t − B_t) / B_t, with B_t the single-task run of task t "
        "with the same seed and h_t = 1 when higher is better: the mean relative loss against "
        "training each task alone. Lower is better; 0 is as good as single-task, negative is "
        "better.",
        "- Step time × EW: training seconds per optimizer step (`epoch_time_s` of the epochs "
        "after the first, data loading included: `num_workers` "
        f"{s['num_workers']}) over those of `sum` (equal weighting) with the same seed.",
        "- kind: loss (one backward pass), gradient (a Jacobian of the shared parameters per "
        "step), static (method sum with `tasks.NAME.weight`, others 1), single-task (reference).",
        "",
    ]
    for dataset, table in report["aggregates"].items():
        tasks = list(DATASETS[dataset]["tasks"])
        heads = [f"{t} {'MAE ↓' if _regression(dataset, t) else 'acc ↑'}" for t in tasks]
        lines += [
            f"## {dataset}: {', '.join(tasks)}",
            "",
            "| method | kind | family | " + " | ".join(heads) + " | Δm% ↓ | step time × EW |",
            "|---|---|---|" + "---|" * len(tasks) + "---|---|",
        ]
        failures = []
        for row in table:
            name = row["name"]
            if row["failed"]:
                name += f" ({row['failed']}/{len(row['seeds'])} seeds failed)"
                failures += [
                    f"- {row['name']}, seed {seed}: `{_cell(err)}`"
                    for seed, err in row["errors"].items()
                ]
            if row["failed"] == len(row["seeds"]):
                error = next(iter(row["errors"].values()))
                cells = ["failed"] * len(tasks) + [f"failed: {_cell(error)[:120]}", "—"]
            else:
                cells = [
                    _fmt(row["metrics"][t], 4 if _regression(dataset, t) else 3)
                    if t in row["metrics"]
                    else ""
                    for t in tasks
                ]
                delta = "0 (reference)" if row["kind"] == "single-task" else _fmt(row["delta_m"], 2)
                cells += [delta, _fmt(row["step_vs_ew"], 2, "×")]
            lines.append(
                f"| {name} | {row['kind']} | {row['family']} | " + " | ".join(cells) + " |"
            )
        if failures:
            lines += ["", "Failures:", "", *failures]
        lines.append("")
    return "\n".join(lines)


def _machine() -> dict:
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every method, baseline and static-weight point; write the JSON and Markdown."""
    from transferkit.balancing import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, 4 methods (for tests)")
    parser.add_argument("--out", default=str(HERE / "results"), help="where results go")
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {SEEDS}; 1 with --quick)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (default: all; sum is always run, as the "
        "step-time reference)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a small shared CPU more threads "
        "make timings erratic when other processes compete)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(METHODS)}")
    else:
        methods = QUICK_METHODS if args.quick else list(METHODS)
    methods = ["sum", *dict.fromkeys(m for m in methods if m != "sum")]
    seeds = list(range(args.seeds if args.seeds is not None else 1 if args.quick else SEEDS))
    if not seeds:
        parser.error("--seeds must be at least 1")
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "quick": args.quick,
        "seeds": seeds,
        "methods": methods,
        "backbone": BACKBONE,
        **cfg,
        **TRAIN,
        "threads": args.threads,
        "image_size": 32,
        "val_fraction": 0.3,
        "freeze": "none",
        "datasets": {
            k: {"tasks": v["tasks"], "grid": v["quick_grid" if args.quick else "grid"]}
            for k, v in DATASETS.items()
        },
    }
    start = time.perf_counter()
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="mtbench_") as tmp:
            work = Path(tmp)
            paths = _write_data(work / "data")
            plan = _plan(methods, seeds, args.quick)
            for i, run in enumerate(plan, 1):
                result = _train_one(run, paths[run["dataset"]], cfg, work)
                results.append(result)
                status = f" FAILED: {result['error']}" if result["error"] else ""
                print(
                    f"[{i}/{len(plan)}] {run['dataset']} {run['name']} seed {run['seed']}: "
                    f"{result['seconds']:.1f} s{status}",
                    flush=True,
                )
        machine = _machine()
    finally:
        torch.set_num_threads(threads)
    _score(results)
    report = {
        "date": datetime.date.today().isoformat(),
        "wall_s": time.perf_counter() - start,
        "machine": machine,
        "settings": settings,
        "aggregates": _aggregate(results),
        "runs": results,
    }
    (out / "multitask.json").write_text(json.dumps(report, indent=2))
    markdown = _markdown(report)
    (out / "multitask.md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
