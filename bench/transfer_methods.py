"""Transfer methods compared: `make bench-transfer` (or `.venv/bin/python -m bench.transfer_methods`).

Real ImageNet weights (EfficientNet-Lite0, the packaged checkpoint that `digits_imagenet.yaml`
loads offline) fine-tuned on handwritten digits 5-9 with a few labels per class, by LP-FT as the
recipe does it (a linear probe, then the whole backbone), and by the same two phases with the
second one changed:
  lora, loha: a peft adapter on every (non-depthwise) convolution; the ImageNet weights stay;
  l2_sp, bss, delta: full fine-tuning with a regularizer (recipe section `regularizers`).
Every method runs over several seeds (each seed draws its own labelled images and initializes
its own heads) at each label budget, in its own process, and reports the last epoch's validation
accuracy of the digit task (not the best epoch's: the validation set would then pick it), the
parameters trained in the second phase, the time per training step in the second phase and the
peak memory: CUDA's `max_memory_allocated` on a GPU, else the process's peak resident set size
(`ru_maxrss`), which includes Python, torch and the data. Writes `transfer_methods.json` and
`transfer_methods.md` under `--out` (default bench/results). `--quick` runs one seed of every
method for two epochs at 32 px (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = "digits_imagenet"
METHODS: dict[str, list[str]] = {
    "lpft": [],
    "lora": ["model.adapter={method: lora, targets: 'regex:.', r: 8, alpha: 16}"],
    "loha": ["model.adapter={method: loha, targets: 'regex:.', r: 8, alpha: 16}"],
    "l2_sp": ["regularizers.l2_sp={alpha: 0.01, beta: 0.01}"],
    "bss": ["regularizers.bss={eta: 0.001, k: 1}"],
    "delta": ["regularizers.delta={beta: 0.01}"],
}
FULL = {"seeds": 3, "budgets": [5, 10], "overrides": []}
QUICK = {
    "seeds": 1,
    "budgets": [5],
    "overrides": [
        "train.epochs=2",
        "data.image_size=32",
        "data.max_samples=20",
        "schedule.phases=[{from_epoch: 0, freeze: all}, {from_epoch: 1, freeze: none}]",
    ],
}


def _data(root: Path, seed: int, per_class: int) -> Path:
    from transferkit.demo.digits import write_few_labels

    return write_few_labels(root / f"seed{seed}" / "digits", per_class=per_class, seed=seed)


def _run(out: Path, overrides: list[str]) -> dict:
    """One training run in its own process (its own peak memory); its measurements."""
    from transferkit.rundir.folder import RunDir

    args = [sys.executable, "-m", "transferkit.cli", "train", RECIPE, "--output", str(out)]
    for override in overrides:
        args += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout).strip().splitlines()[-1][:300]}
    records = RunDir(out).records()
    last, before = records[-1], records[-2] if len(records) > 1 else {"step": 0}
    steps = max(last["step"] - before["step"], 1)
    return {
        "accuracy": last["val/digit/accuracy"],
        "trainable_params": last["trainable_params"],
        "step_s": last["epoch_time_s"] / steps,
        "peak_memory_mb": last["peak_memory_mb"],
        "error": None,
    }


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["error"] is None]
    if not ok:
        return {"error": runs[0]["error"]}
    acc = [r["accuracy"] for r in ok]
    return {
        "accuracy_mean": statistics.fmean(acc),
        "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "trainable_params": ok[0]["trainable_params"],
        "step_s": statistics.median(r["step_s"] for r in ok),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in ok),
        "seeds": len(ok),
        "error": None,
    }


def _markdown(report: dict) -> str:
    memory = "CUDA max_memory_allocated" if report["cuda"] else "peak RSS of the run's process"
    lines = [
        f"Digits 5-9 from ImageNet EfficientNet-Lite0, {report['seeds']} seeds; last-epoch "
        f"validation accuracy of the digit task (mean ± std); memory: {memory}.",
        "",
        "| labels/class | method | accuracy | vs LP-FT | trainable params (phase 2) "
        "| step (s) | peak memory (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget, methods in report["results"].items():
        base = methods.get("lpft", {}).get("accuracy_mean")
        for name, row in methods.items():
            if row.get("error"):
                lines.append(f"| {budget} | {name} | failed: {row['error']} | | | | |")
                continue
            delta = "" if base is None or name == "lpft" else f"{row['accuracy_mean'] - base:+.3f}"
            lines.append(
                f"| {budget} | {name} | {row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} "
                f"| {delta} | {row['trainable_params']:,} | {row['step_s']:.3f} "
                f"| {row['peak_memory_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, two epochs, 32 px")
    parser.add_argument("--out", default=str(HERE / "results"), help="where the results go")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--work", default=None, help="data and run folders (default: OUT/work)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a recipe override for every run, to measure a variant",
    )  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    mode = QUICK if args.quick else FULL
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "transfer_work"
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}: use {', '.join(METHODS)}")
    start = time.perf_counter()
    results: dict[str, dict] = {}
    for budget in mode["budgets"]:
        results[str(budget)] = {}
        for method in methods:
            runs = []
            for seed in range(mode["seeds"]):
                manifest = _data(work / "data", seed, budget)
                overrides = [f"data.path={manifest}", f"seed={seed}", *mode["overrides"],
                             *METHODS[method], *args.set]  # fmt: skip
                run = _run(work / "runs" / f"{budget}_{method}_{seed}", overrides)
                print(f"{budget} labels/class, {method}, seed {seed}: {run}", flush=True)
                runs.append(run)
            results[str(budget)][method] = _summary(runs)
    report = {
        "quick": args.quick,
        "seeds": mode["seeds"],
        "cuda": torch.cuda.is_available(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - start, 1),
        "overrides": args.set,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer_methods.json").write_text(json.dumps(report, indent=2))
    (out / "transfer_methods.md").write_text(_markdown(report))
    print(_markdown(report))
    return report


if __name__ == "__main__":
    main()
