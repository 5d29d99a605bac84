"""Training features on the digits: `.venv/bin/python -m bench.features` (`--quick`: toy sizes).

Each feature of issue 15 is switched on alone against a baseline, over 3 seeds, and scored on a
held-out test split; writes `bench/results/features.json` and `features.md` (the table in
docs/training_features.md). The data: the transfer digits 5-9 (digit: multiclass, parity:
binary, ink: regression, a fifth of parity and ink labels missing), with the training classes
made imbalanced (5 is 16x as frequent as 9) and balanced validation and test splits, so that
the class-imbalance options have something to fix. The model: timm's `test_resnet` from random
weights at 32 px (the CPU budget is small), digits never mirrored (`data.horizontal_flip:
false`). Test-time augmentation and the temperature are applied to the baseline runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = 3
# Training rows per digit 5..9 (imbalanced), and validation / test rows per digit (balanced).
FULL = {"epochs": 8, "train": [128, 64, 32, 16, 8], "held_out": 30, "batch": 32}
QUICK = {"epochs": 1, "train": [8, 6, 4, 2, 2], "held_out": 4, "batch": 8}

# key -> (label, recipe overrides, what it does). TTA and temperature reuse the baseline's runs.
FEATURES = {
    "baseline": ("baseline", [], "plain losses, no EMA, no mixing"),
    "smoothing": ("label smoothing 0.1",
                  ["tasks.digit.label_smoothing=0.1", "tasks.parity.label_smoothing=0.1"],
                  "digit and parity targets smoothed by 0.1"),
    "class_weights": ("class weights (balanced)", ["tasks.digit.class_weights=balanced"],
                      "digit cross-entropy weighted by n / (5 * count)"),
    "sampler": ("balanced sampler", ["data.balanced_sampler=digit"],
                "training rows drawn with equal weight per digit"),
    "focal": ("focal loss (parity)", ["tasks.parity.focal_gamma=2"], "parity: focal loss, gamma 2"),
    "ema": ("EMA (final model)", ["train.ema.decay=0.98", "train.ema.final_model=true"],
            "the saved model is the EMA of the weights (decay 0.98, warmup)"),
    "mixup": ("mixup", ["train.mixup.cutmix_alpha=0"], "mixup alpha 0.8 on every batch"),
    "cutmix": ("CutMix", ["train.mixup.mixup_alpha=0"], "CutMix alpha 1.0 on every batch"),
    "tta": ("TTA crops", None, "baseline runs; test predictions averaged over 5 crops + the image"),
    "temperature": ("temperature", None,
                    "baseline runs; temperatures fitted on validation (`transferkit calibrate`)"),
}  # fmt: skip
QUICK_FEATURES = ["baseline", "ema", "mixup", "tta", "temperature"]
METRICS = ("digit/accuracy", "digit/f1", "digit/ece", "parity/f1", "parity/ece", "ink/mae")


def write_data(root: Path, cfg: dict) -> Path:
    """The imbalanced manifest (a `split` column) over the transfer digits; returns its path."""
    from transferkit.demo.digits import write_digits

    write_digits(root / "digits")
    source = root / "digits" / "transfer" / "manifest.csv"
    with source.open() as handle:
        rows = list(csv.DictReader(handle))
    rng = random.Random(0)
    rng.shuffle(rows)
    out, held = [], cfg["held_out"]
    for digit, count in zip("56789", cfg["train"]):
        mine = [r for r in rows if r["digit"] == digit]
        splits = ["validation"] * held + ["test"] * held + ["train"] * count
        out += [{**r, "image": f"transfer/{r['image']}", "split": s} for r, s in zip(mine, splits)]
    path = root / "digits" / "imbalanced.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    return path


def base_recipe(manifest: Path, cfg: dict, seed: int) -> dict:
    return {
        "name": "features", "seed": seed,
        "model": {"backbone": "timm:test_resnet", "weights": "none"},
        "tasks": {"digit": {"kind": "multiclass"},
                  "parity": {"kind": "binary", "classes": ["even", "odd"]},
                  "ink": {"kind": "regression", "weight": 0.5}},
        "data": {"source": "manifest", "path": str(manifest), "val_split": "validation",
                 "test_split": "test", "image_size": 32, "augment": "light",
                 "horizontal_flip": False, "num_workers": 0},
        "train": {"epochs": cfg["epochs"], "batch_size": cfg["batch"], "lr": 0.003,
                  "weight_decay": 0.01, "monitor": "val/digit/accuracy", "keep_checkpoints": 1},
    }  # fmt: skip


def test_metrics(run_dir: Path, tta: list[str] | None = None) -> dict[str, float]:
    from transferkit.runs import evaluate_run

    values = evaluate_run(run_dir, split="test", device="cpu", tta=tta or [])
    return {m: values[f"test/{m}"] for m in METRICS}


def run_seed(manifest: Path, cfg: dict, seed: int, out: Path, keys: list[str]) -> dict[str, dict]:
    """The test metrics of the features `keys` for one seed."""
    from transferkit.engine import train
    from transferkit.recipes import parse_recipe
    from transferkit.runs.calibration import calibrate_run

    results = {}
    for key in keys:
        overrides = FEATURES[key][1]
        if overrides is None:
            continue
        recipe = parse_recipe(base_recipe(manifest, cfg, seed), overrides)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            run_dir = train(recipe, output=str(out / f"{key}_{seed}"))
        results[key] = {**test_metrics(run_dir), "train_s": round(time.perf_counter() - start, 1)}
        if key == "baseline":
            if "tta" in keys:
                results["tta"] = test_metrics(run_dir, ["crops"])
            if "temperature" in keys:
                with contextlib.redirect_stdout(io.StringIO()):
                    calibrate_run(run_dir, "validation", "cpu")
                results["temperature"] = test_metrics(run_dir)
    return results


def summarize(per_seed: list[dict]) -> dict[str, dict]:
    """Mean and standard deviation over seeds of every feature's metrics."""
    summary = {}
    for key in [k for k in FEATURES if k in per_seed[0]]:  # the table's order
        rows = [seed[key] for seed in per_seed]
        summary[key] = {
            m: {"mean": statistics.fmean(r[m] for r in rows),
                "std": statistics.pstdev([r[m] for r in rows]) if len(rows) > 1 else 0.0}
            for m in METRICS
        }  # fmt: skip
    return summary


def markdown(summary: dict, seeds: int, cfg: dict) -> str:
    head = "| feature | what | " + " | ".join(METRICS) + " |"
    lines = [
        f"Test split, mean ± std over {seeds} seed(s); {cfg['epochs']} epochs, training digits "
        f"5-9 with {'/'.join(map(str, cfg['train']))} rows, {cfg['held_out']} per digit in "
        "validation and test. Accuracy, F1: higher is better; ECE, MAE: lower. A change "
        "smaller than the std is noise.",
        "",
        head,
        "|" + "---|" * (len(METRICS) + 2),
    ]
    base = summary["baseline"]
    for key, values in summary.items():
        cells = []
        for m in METRICS:
            mean, std = values[m]["mean"], values[m]["std"]
            delta = "" if key == "baseline" else f" ({mean - base[m]['mean']:+.3f})"
            cells.append(f"{mean:.3f} ± {std:.3f}{delta}")
        label, _, what = FEATURES[key]
        lines.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, 1 seed (for tests)")
    parser.add_argument("--out", default=str(HERE / "results"), help="where results go")
    parser.add_argument("--seeds", type=int, default=None, help=f"default {SEEDS}; 1 with --quick")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--features", default=None,
        help=f"comma-separated, baseline always included (default: all; --quick: {', '.join(QUICK_FEATURES)})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    cfg = QUICK if args.quick else FULL
    seeds = list(range(args.seeds if args.seeds is not None else 1 if args.quick else SEEDS))
    if not seeds:
        parser.error("--seeds must be at least 1")
    chosen = (
        args.features.split(",") if args.features else QUICK_FEATURES if args.quick else FEATURES
    )
    unknown = [k for k in chosen if k not in FEATURES]
    if unknown:
        parser.error(f"unknown feature(s) {', '.join(unknown)}; features: {', '.join(FEATURES)}")
    keys = ["baseline", *(k for k in FEATURES if k in chosen and k != "baseline")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_data(Path(tmp), cfg)
        per_seed = [run_seed(manifest, cfg, seed, Path(tmp) / "runs", keys) for seed in seeds]
    summary = summarize(per_seed)
    report = {"settings": {**cfg, "seeds": seeds}, "per_seed": per_seed, "summary": summary}
    (out / "features.json").write_text(json.dumps(report, indent=2))
    (out / "features.md").write_text(markdown(summary, len(seeds), cfg))
    print(markdown(summary, len(seeds), cfg))
    return report


if __name__ == "__main__":
    main()
