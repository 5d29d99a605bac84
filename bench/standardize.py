"""A regression target in its own units beside two classification tasks, learned raw or
standardized: `.venv/bin/python -m bench.standardize` (about 10 minutes on 2 cores).

Digits 5-9 from ImageNet EfficientNet-Lite0 (the packaged checkpoint, `digits_imagenet.yaml`:
LP-FT, 8 + 8 epochs at 64 px) with three tasks: the digit, its parity, and `ink`, the number of
inked pixels of the 32 px image (a count of about 90 to 420, sd about 60: a target in its own
units, as a size in pixels is). Each seed draws its own labelled images; the runs differ only in
`tasks.ink.standardize`. Reports the last epoch's validation digit and parity accuracy and ink
R2 and MAE, mean ± std over seeds, and the paired difference with its standard error; writes
`standardize.json` and `standardize.md` under `--out` (default bench/results). `--quick`: one
seed, two epochs, 32 px (the tests run it).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.training import train_in_process

HERE = Path(__file__).resolve().parent
RECIPE = "digits_imagenet"
METRICS = ("val/digit/accuracy", "val/parity/accuracy", "val/ink/r2", "val/ink/mae")
FULL = {"seeds": 5, "budgets": [10, 50], "overrides": []}
QUICK = {
    "seeds": 1,
    "budgets": [10],
    "overrides": [
        "train.epochs=2",
        "data.image_size=32",
        "schedule.phases=[{from_epoch: 0, freeze: all}, {from_epoch: 1, freeze: none}]",
    ],
}


def _data(root: Path, seed: int, per_class: int) -> Path:
    """The few-label manifest with `ink` replaced by the count of inked pixels."""
    from transferkit.demo import write_few_labels

    few = write_few_labels(root / f"seed{seed}" / "digits", per_class=per_class, seed=seed)
    target = few.with_name(f"ink_pixels_{per_class}.csv")
    with few.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        pixels = np.asarray(Image.open(few.parent / row["image"]).convert("L"))
        row["ink"] = str(int((pixels > 64).sum()))
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


def _run(out: Path, overrides: list[str]) -> dict:
    from transferkit.rundir import RunDir

    error = train_in_process(RECIPE, out, overrides, threads="1")
    if error:
        return {"error": error}
    last = RunDir(out).records()[-1]
    return {**{m: last[m] for m in METRICS}, "error": None}


def _paired(raw: list[dict], standardized: list[dict], metric: str) -> tuple[float, float]:
    diffs = [s[metric] - r[metric] for r, s in zip(raw, standardized)]
    error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), error


def _markdown(report: dict) -> str:
    lines = [
        f"Digits 5-9 from ImageNet EfficientNet-Lite0 (LP-FT), {report['seeds']} seeds; `ink` "
        "is a count of inked pixels. Last-epoch validation metrics, mean ± std; the difference "
        "is standardized minus raw, paired by seed, ± its standard error.",
        "",
        "| labels/class | metric | raw units | standardized | difference |",
        "|---|---|---|---|---|",
    ]
    for budget, runs in report["results"].items():
        for metric in METRICS:
            cells = []
            for name in ("raw", "standardized"):
                values = [r[metric] for r in runs[name]]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.3f} ± {std:.3f}")
            mean, error = _paired(runs["raw"], runs["standardized"], metric)
            lines.append(
                f"| {budget} | {metric} | {cells[0]} | {cells[1]} | {mean:+.3f} ± {error:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, two epochs, 32 px")
    parser.add_argument("--out", default=str(HERE / "results"), help="where the results go")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="standardize_") as scratch:  # runs are GBs
        results = _measure(mode, Path(scratch))
    report = {"seeds": mode["seeds"], "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "standardize.json").write_text(json.dumps(report, indent=2))
    (out / "standardize.md").write_text(_markdown(report))
    print(_markdown(report))
    return report


def _measure(mode: dict, work: Path) -> dict[str, dict[str, list[dict]]]:
    results: dict[str, dict[str, list[dict]]] = {}
    for budget in mode["budgets"]:
        results[str(budget)] = {"raw": [], "standardized": []}
        for seed in range(mode["seeds"]):
            data = _data(work, seed, budget)
            base = [*mode["overrides"], f"seed={seed}", f"data.path={data}"]
            for name, flag in (("raw", "false"), ("standardized", "true")):
                run = _run(
                    work / f"{budget}_{seed}_{name}", [*base, f"tasks.ink.standardize={flag}"]
                )
                if run["error"]:
                    raise SystemExit(f"{name} run, seed {seed}, {budget}/class: {run['error']}")
                results[str(budget)][name].append(run)
                print(
                    f"{budget}/class seed {seed} {name}: "
                    + ", ".join(f"{m} {run[m]:.3f}" for m in METRICS),
                    flush=True,
                )
    return results


if __name__ == "__main__":
    main()
