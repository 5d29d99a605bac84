"""Greedy against uniform soups, the best single run and the output ensemble:
`.venv/bin/python -m bench.soups` (about 15 minutes on 2 cores).

Digits 5-9 from ImageNet EfficientNet-Lite0 (`digits_imagenet.yaml`: LP-FT, 10 labels per
class, 40 per class to validate). Per seed, five fine-tunes of the one starting point that
differ only in the learning rate (the model-soups paper's ingredients are such a sweep). The
greedy soup and the best single run are chosen on the validation split; every model is then
scored on held-out test images that no run saw (the rest of the transfer digits). Reports test
digit accuracy and ink MAE, mean ± std over seeds, and how many runs the greedy soup kept;
writes `soups.json` and `soups.md` under `--out` (default bench/results). `--quick`: one seed,
two runs of two epochs at 32 px (the tests run it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.training import train_in_process

HERE = Path(__file__).resolve().parent
RECIPE = "digits_imagenet"
LRS = [0.003, 0.002, 0.001, 0.0005, 0.0002]
FULL = {"seeds": 3, "lrs": LRS, "overrides": []}
QUICK = {
    "seeds": 1,
    "lrs": [0.003, 0.001],
    "overrides": [
        "train.epochs=2",
        "data.image_size=32",
        "schedule.phases=[{from_epoch: 0, freeze: all}, {from_epoch: 1, freeze: none}]",
    ],
}
MODELS = ("best single run", "uniform soup", "greedy soup", "output ensemble")
METRICS = (("digit", "accuracy"), ("ink", "mae"))


def _data(root: Path, seed: int) -> tuple[Path, Path]:
    """The few-label manifest and a test manifest of the transfer digits it does not use."""
    import pandas as pd

    from transferkit.demo import write_few_labels

    few = write_few_labels(root / f"seed{seed}" / "digits", per_class=10, seed=seed)
    every = pd.read_csv(few.parent / "manifest.csv", dtype=str, keep_default_na=False)
    used = set(pd.read_csv(few, dtype=str)["image"])
    test = every[~every["image"].isin(used)]
    path = few.with_name("test.csv")
    test.to_csv(path, index=False)
    return few, path


def _train(out: Path, overrides: list[str]) -> None:
    error = train_in_process(RECIPE, out, overrides, threads="1")
    if error:
        raise SystemExit(f"{out}: {error}")


def _one_seed(work: Path, seed: int, mode: dict) -> dict:
    from transferkit.runs import evaluate_ensemble, evaluate_run

    few, test = _data(work, seed)
    members = []
    for lr in mode["lrs"]:
        out = work / f"seed{seed}_lr{lr}"
        _train(out, [*mode["overrides"], f"seed={seed}", f"data.path={few}", f"train.lr={lr}"])
        members.append(str(out))
    greedy_dir = work / f"seed{seed}_greedy"
    chosen = evaluate_ensemble(members, "validation", with_soup="greedy", save_soup=greedy_dir)
    path = chosen["greedy path"]
    best = path["steps"][0]["run"]  # the best single run by validation score
    on_test = evaluate_ensemble(members, data=str(test), with_soup="uniform")
    greedy = evaluate_run(greedy_dir, data=str(test), device="cpu")
    scores = {
        "best single run": on_test[best],
        "uniform soup": on_test["soup"],
        "greedy soup": {t: {m: greedy[f"validation/{t}/{m}"]} for t, m in METRICS},
        "output ensemble": on_test["ensemble"],
    }
    row = {who: {f"{t}/{m}": scores[who][t][m] for t, m in METRICS} for who in MODELS}
    row["kept"] = len(path["ingredients"])
    row["best lr"] = float(best.rsplit("_lr", 1)[1])
    row["test images"] = int(greedy["validation/digit/count"])
    return row


def _markdown(report: dict) -> str:
    rows = report["seeds"]
    lines = [
        f"Digits 5-9 from ImageNet EfficientNet-Lite0 (LP-FT, 10 labels per class), "
        f"{len(rows)} seeds, {len(report['lrs'])} runs per seed (learning rates "
        f"{', '.join(map(str, report['lrs']))}). The best run and the greedy soup are chosen "
        "on the validation split; the numbers are on held-out test digits, mean ± std.",
        "",
        "| model | test digit accuracy | test ink MAE |",
        "|---|---|---|",
    ]
    for who in MODELS:
        cells = []
        for t, m in METRICS:
            values = [r[who][f"{t}/{m}"] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} ± {std:.3f}")
        lines.append(f"| {who} | " + " | ".join(cells) + " |")
    kept = ", ".join(str(r["kept"]) for r in rows)
    lines += ["", f"Runs the greedy soup kept, per seed: {kept} of {len(report['lrs'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, two short runs, 32 px")
    parser.add_argument("--out", default=str(HERE / "results"), help="where the results go")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    rows = []
    with tempfile.TemporaryDirectory(prefix="soups_") as scratch:  # runs are GBs
        for seed in range(mode["seeds"]):
            rows.append(_one_seed(Path(scratch), seed, mode))
            print(f"seed {seed}: " + json.dumps(rows[-1]), flush=True)
    report = {"lrs": mode["lrs"], "seeds": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soups.json").write_text(json.dumps(report, indent=2))
    (out / "soups.md").write_text(_markdown(report))
    print(_markdown(report))
    return report


if __name__ == "__main__":
    main()
