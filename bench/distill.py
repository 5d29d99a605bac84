"""A small student distilled from an ImageNet teacher, against the same student trained alone:
`.venv/bin/python -m bench.distill` (about 25 minutes on 2 cores).

Two task sets, each with few labels and a pool of unlabelled images, scored on held-out test
images no run saw:
  digits:   digits 5-9 (digit, parity, ink), 10 labels per class, 40 per class to validate;
  overlaid: two overlaid digits per image (left, right: 0-9), 100 labelled images.
Per seed, the teacher is ImageNet EfficientNet-Lite0 fine-tuned with LP-FT on the labelled
images (`digits_imagenet.yaml`'s schedule); the student is timm's resnet10t from random
weights (no small ImageNet backbone loads offline), trained on the labelled images alone, or
distilled from the teacher (alpha 0.5, T 2) on them and the unlabelled pool. Reports test
metrics mean ± std over seeds, and each model's images per second (CPU, batch 64, 64 px).
Writes `distill.json` and `distill.md` under `--out` (default bench/results). `--quick`: one
seed, one task set, two epochs at 32 px (the tests run it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from bench.training import train_in_process

HERE = Path(__file__).resolve().parent
TEACHER = "timm:tf_efficientnet_lite0"
STUDENT = "timm:resnet10t"
MODELS = ("teacher", "student alone", "student distilled")
FULL = {"seeds": 3, "sets": ["digits", "overlaid"], "epochs": 16, "probe": 8, "size": 64}
QUICK = {"seeds": 1, "sets": ["digits"], "epochs": 2, "probe": 1, "size": 32}
METRICS = {"digits": ["digit/accuracy", "parity/accuracy", "ink/mae"],
           "overlaid": ["left/accuracy", "right/accuracy"]}  # fmt: skip
TASKS = {
    "digits": {"digit": {"kind": "multiclass"},
               "parity": {"kind": "binary", "classes": ["even", "odd"]},
               "ink": {"kind": "regression", "weight": 0.5}},
    "overlaid": {"left": {"kind": "multiclass"}, "right": {"kind": "multiclass"}},
}  # fmt: skip


def _manifests(root: Path, task_set: str, seed: int) -> dict[str, Path]:
    """labelled (train + validation), unlabelled and test manifests for one seed."""
    import numpy as np
    import pandas as pd

    from transferkit.demo import write_few_labels
    from transferkit.demo.digits import write_overlaid_digits

    folder = root / f"{task_set}_seed{seed}"
    if task_set == "digits":
        few = write_few_labels(folder / "digits", per_class=10, seed=seed)
        every = pd.read_csv(few.parent / "manifest.csv", dtype=str, keep_default_na=False)
        labelled = pd.read_csv(few, dtype=str, keep_default_na=False)
        rest = every[~every["image"].isin(set(labelled["image"]))]
        base = few.parent
    else:
        base = write_overlaid_digits(folder / "overlaid")
        every = pd.read_csv(base / "manifest.csv", dtype=str)
        order = np.random.default_rng(seed).permutation(len(every))
        labelled = every.iloc[order[:300]].copy()
        labelled["split"] = ["train"] * 100 + ["validation"] * 200
        rest = every.iloc[order[300:]]
    order = np.random.default_rng(seed + 100).permutation(len(rest))
    pool, test = rest.iloc[order[: len(rest) // 2]], rest.iloc[order[len(rest) // 2 :]]
    paths = {"labelled": base / "labelled.csv", "unlabelled": base / "unlabelled.csv",
             "test": base / "test.csv"}  # fmt: skip
    labelled.to_csv(paths["labelled"], index=False)
    pool[["image"]].to_csv(paths["unlabelled"], index=False)
    test.drop(columns=[c for c in ("split",) if c in test]).to_csv(paths["test"], index=False)
    return paths


def _recipe(task_set: str, seed: int, mode: dict, data: Path, teacher: bool) -> dict:
    size, epochs = mode["size"], mode["epochs"]
    phases = ([{"from_epoch": 0, "freeze": "all"}, {"from_epoch": mode["probe"], "freeze": "none"}]
              if teacher else [{"from_epoch": 0, "freeze": "none"}])  # fmt: skip
    return {
        "name": f"{task_set}_{'teacher' if teacher else 'student'}", "seed": seed,
        "model": {"backbone": TEACHER if teacher else STUDENT,
                  "weights": "pretrained" if teacher else "none"},
        "tasks": TASKS[task_set],
        "data": {"source": "manifest", "path": str(data), "image_size": size, "augment": "none",
                 "horizontal_flip": False},
        "schedule": {"phases": phases},
        "train": {"epochs": epochs, "trackers": []},
    }  # fmt: skip


def _train(out: Path, recipe: dict, overrides: list[str] = ()) -> None:
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    error = train_in_process(path, out, list(overrides))
    if error:
        raise SystemExit(f"{out}: {error}")


def _images_per_second(run_dir: Path, size: int) -> float:
    """Forward passes of a batch of 64, median of 5 after a warm-up."""
    import torch

    import transferkit as tk

    model = tk.load(run_dir).model.eval()
    batch = torch.randn(64, 3, size, size)
    timings = []
    with torch.no_grad():
        model(batch)
        for _ in range(5):
            start = time.perf_counter()
            model(batch)
            timings.append(time.perf_counter() - start)
    return 64 / statistics.median(timings)


def _one(work: Path, task_set: str, seed: int, mode: dict) -> dict:
    from transferkit.runs import evaluate_run

    paths = _manifests(work, task_set, seed)
    runs = {who: work / f"{task_set}_{seed}_{who.replace(' ', '_')}" for who in MODELS}
    _train(runs["teacher"], _recipe(task_set, seed, mode, paths["labelled"], True))
    student = _recipe(task_set, seed, mode, paths["labelled"], False)
    _train(runs["student alone"], student)
    _train(runs["student distilled"], student, [f"distill.teacher={runs['teacher']}",
                                                f"data.unlabeled={paths['unlabelled']}"])  # fmt: skip
    row = {}
    for who, run in runs.items():
        values = evaluate_run(run, data=str(paths["test"]), device="cpu")
        row[who] = {m: values[f"validation/{m}"] for m in METRICS[task_set]}
        row[who]["images/s"] = _images_per_second(run, mode["size"])
    first_task = METRICS[task_set][0].split("/")[0]
    row["test images"] = int(values[f"validation/{first_task}/count"])
    return row


def _markdown(report: dict) -> str:
    lines = [
        f"Teacher: ImageNet EfficientNet-Lite0 (LP-FT); student: resnet10t from random weights, "
        f"alone or distilled (alpha 0.5, T 2, with the unlabelled pool). {report['seeds']} "
        "seeds; test metrics (held-out images), mean ± std; images/s: CPU forward, batch 64.",
    ]
    for task_set, rows in report["results"].items():
        metrics = [*METRICS[task_set], "images/s"]
        lines += ["", f"**{task_set}** ({rows[0]['test images']} test images)", "",
                  "| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]  # fmt: skip
        for who in MODELS:
            cells = []
            for metric in metrics:
                values = [r[who][metric] for r in rows]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                digits = 0 if metric == "images/s" else 3
                cells.append(f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}")
            lines.append(f"| {who} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, digits, two epochs")
    parser.add_argument("--out", default=str(HERE / "results"), help="where the results go")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="distill_") as scratch:  # runs are GBs
        for task_set in mode["sets"]:
            for seed in range(mode["seeds"]):
                row = _one(Path(scratch), task_set, seed, mode)
                results.setdefault(task_set, []).append(row)
                print(f"{task_set} seed {seed}: {json.dumps(row)}", flush=True)
    report = {"seeds": mode["seeds"], "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill.json").write_text(json.dumps(report, indent=2))
    (out / "distill.md").write_text(_markdown(report))
    print(_markdown(report))
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
