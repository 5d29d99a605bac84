"""`make bench-fit`: does `transferkit fit` choose well, on data it was not tuned on?

For each task set of bench/fit_sets.py (digits, glyphs, shapes; crops held out), each number of
labelled images per class and each seed, four ways a user could train on the same table,
one after another, each in its own process:
  - `fit` with `--time-budget` (the bench's budget; the search, its trials and the final run);
  - `defaults`: `fit --no-search`, the plan's plain defaults (ImageNet Lite0, LP-FT, lr 1e-3);
    fit's own first trial is exactly this run (the same recipe and seed; tests/test_fit.py
    checks that a plan trains the same run again), so when it finished, its model and time
    are used rather than training it a second time;
  - `full FT`: `fit --no-search` with one phase that trains everything, the best fixed recipe
    of docs/quality.md (it led LP-FT at every label budget there);
  - `hand-written LP-FT`: plain PyTorch on the plan's data (bench/fit_handwritten.py), what a
    careful user writes without the tool; the plan comes from `fit --dry-run`.
All four use the plan fit makes (tasks typed from the table, 20% of the labelled rows carved
for validation with seed 0). Each model is scored on the set's test images, which no command
saw: the mean over tasks of accuracy (classification) or R^2 (regression), and the first
task's accuracy. Reports mean ± sd over seeds, the paired difference fit - each other method
with its standard error, the seconds each command took, and the methods fit chose.
Writes `fit.json` and `fit.md` under `--out` (default bench/results). `--quick`: timm's tiny
test model from random weights, one set, one seed, 2 epochs (tests/test_bench.py runs it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.fit_sets import HELD_OUT, PRIMARY, SETS, labelled

HERE = Path(__file__).resolve().parent
HAND_WRITTEN = "hand-written LP-FT"
METHODS = ("fit", "defaults", "full FT", HAND_WRITTEN)
FULL = {
    "sets": list(SETS),
    "budgets": [5, 10, 20, 50],
    "seeds": [0, 1, 2],
    "minutes": 2.0,
    "extra": [],
}
QUICK = {"sets": ["shapes"], "budgets": [5], "seeds": [0], "minutes": 0.5,
         "extra": ["model.backbone=timm:test_efficientnet", "model.weights=none",
                   "train.epochs=2"]}  # fmt: skip
_FULL_FT = "schedule.phases=[{from_epoch: 0, freeze: none}]"


def _command(method: str, data: Path, out: Path, minutes: float, extra: list[str]) -> list[str]:
    args = [sys.executable, "-m", "transferkit.cli", "fit", str(data), "--output", str(out),
            "--overwrite"]  # fmt: skip
    if method == "fit":
        args += ["--time-budget", str(minutes)]
    else:
        args += ["--no-search"]
    sets = [*extra, *([_FULL_FT] if method == "full FT" else [])]
    for item in sets:
        args += ["--set", item]
    return args


def _score(run_dir: Path) -> dict:
    """Test metrics of a finished run: the fit score and the first task's accuracy."""
    from transferkit.recipes import load_recipe
    from transferkit.runs import evaluate_run
    from transferkit.select import fit_score

    metrics = evaluate_run(run_dir, split="test")
    tasks = {n: t.kind for n, t in load_recipe(run_dir / "recipe.yaml").tasks.items()}
    record = {"val/" + k.split("/", 1)[1]: v for k, v in metrics.items()}  # test/TASK/METRIC
    first = next(iter(tasks))
    return {"score": fit_score(record, tasks), "first": record.get(f"val/{first}/accuracy")}


def _one(work: Path, task_set: str, per_class: int, seed: int, method: str, cfg: dict) -> dict:
    data = labelled(work / "sets", task_set, per_class, seed)
    out = work / "runs" / f"{task_set}_k{per_class}_s{seed}_{method.replace(' ', '_')}"
    row = {"set": task_set, "per_class": per_class, "seed": seed, "method": method}
    first = work / "runs" / f"{task_set}_k{per_class}_s{seed}_fit" / "trials"
    done = sorted(first.glob("00_lp-ft_lr0.001/complete.json"))
    if method == "defaults" and done and "pruned" not in done[0].read_text():
        trial = next(csv.DictReader((first.parent / "fit_trials.csv").open()))
        return (
            row
            | {"seconds": float(trial["seconds"]), "from": "fit's trial 0"}
            | _score(done[0].parent)
        )
    env = dict(os.environ, TRANSFERKIT_CACHE=str(work / "cache"))
    if method == HAND_WRITTEN:
        return row | _hand_written(data, out, cfg, env)
    start = time.perf_counter()
    done = subprocess.run(_command(method, data, out, cfg["minutes"], cfg["extra"]),
                          capture_output=True, text=True, env=env)  # fmt: skip
    seconds = time.perf_counter() - start
    row["seconds"] = round(seconds, 1)
    if done.returncode != 0:
        return row | {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:300]}
    row |= _score(out)
    if method == "fit":
        trials = (out / "fit_trials.csv").read_text().splitlines()
        report = (out / "fit_report.md").read_text()
        chosen = next(line for line in report.splitlines() if "**(chosen)**" in line)
        row |= {"trials": len(trials) - 1, "chose": chosen.split("|")[2].strip(),
                "chose_lr": chosen.split("|")[3].strip(),
                "kept_defaults": "the defaults are kept" in report or "**(chosen)** | lp-ft | 0.001" in report}  # fmt: skip
    return row


def _hand_written(data: Path, out: Path, cfg: dict, env: dict) -> dict:
    """bench/fit_handwritten.py on the plan `fit --dry-run` writes (the defaults' data, rows,
    image size and epochs); only the training loop's process is timed."""
    plan = [*_command("defaults", data, out, cfg["minutes"], cfg["extra"]), "--dry-run"]
    done = subprocess.run(plan, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:300]}
    scores = out / "hand_written.json"
    command = [sys.executable, "-m", "bench.fit_handwritten", str(out / "plan.yaml"),
               "--json", str(scores)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent)
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {"seconds": seconds,
                "error": (done.stderr or done.stdout).strip().splitlines()[-1][:300]}  # fmt: skip
    found = json.loads(scores.read_text())
    return {"seconds": seconds, "score": found["score"], "first": found["first"]}


def _summary(rows: list[dict]) -> list[dict]:
    table = []
    keys = sorted({(r["set"], r["per_class"]) for r in rows}, key=lambda k: (k[0] == HELD_OUT, k))
    for task_set, per_class in keys:
        here = [r for r in rows if (r["set"], r["per_class"]) == (task_set, per_class)]
        entry = {"set": task_set, "per_class": per_class, "held_out": task_set == HELD_OUT}
        by_seed = {m: {r["seed"]: r for r in here if r["method"] == m and "score" in r}
                   for m in METHODS}  # fmt: skip
        for method, seeds in by_seed.items():
            scores = [r["score"] for r in seeds.values()]
            entry[method] = _mean_sd(scores)
            entry[f"{method} s"] = (
                round(statistics.mean([r["seconds"] for r in seeds.values()]), 1) if seeds else None
            )
            entry[f"{method} first"] = _mean_sd([r["first"] for r in seeds.values()])
        for other in METHODS[1:]:
            for key, suffix in (("score", ""), ("first", " first")):
                paired = [by_seed["fit"][s][key] - by_seed[other][s][key]
                          for s in by_seed["fit"] if s in by_seed[other]]  # fmt: skip
                entry[f"fit - {other}{suffix}"] = _mean_se(paired)
        entry["fit chose"] = ", ".join(
            f"{r['chose']} {r['chose_lr']}" for r in by_seed["fit"].values()
        )
        table.append(entry)
    return table


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _mean_se(values: list[float]) -> str:
    if not values:
        return "-"
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.3f} ± {se:.3f}"


def _markdown(report: dict) -> str:
    cfg = report["config"]
    seeds = {}
    for row in report["rows"]:
        seeds.setdefault(row["set"], set()).add(row["seed"])
    counted = ", ".join(f"{name} {len(found)}" for name, found in seeds.items())
    lines = [f"# bench-fit: `fit` against fixed recipes ({report['device']})", "",
             f"Sets {', '.join(seeds)} ({HELD_OUT} held out), {cfg['budgets']} labelled "
             f"images per class, seeds per set: {counted}; fit's budget {cfg['minutes']:g} min. "
             "Test score: mean over tasks of accuracy or R^2 on test images no run saw; "
             "mean ± sd over seeds; paired differences mean ± standard error.", "",
             "| set | labels/class | fit | defaults | full FT | hand-written | fit - defaults "
             "| fit - full FT | fit - hand-written | seconds (fit / defaults / full / hand) "
             "| fit chose |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in report["summary"]:
        name = f"{e['set']} (held out)" if e["held_out"] else e["set"]
        seconds = " / ".join(str(e[f"{m} s"]) for m in METHODS)
        lines.append(f"| {name} | {e['per_class']} | " + " | ".join(e[m] for m in METHODS)
                     + " | " + " | ".join(e[f"fit - {m}"] for m in METHODS[1:])
                     + f" | {seconds} | {e['fit chose']} |")  # fmt: skip
    lines += ["", "The first task's test accuracy (digit, letter, shape, region):", "",
              "| set | labels/class | fit | defaults | full FT | hand-written | fit - defaults "
              "| fit - full FT | fit - hand-written |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in report["summary"]:
        name = f"{e['set']} (held out)" if e["held_out"] else e["set"]
        lines.append(f"| {name} | {e['per_class']} | "
                     + " | ".join(e[f"{m} first"] for m in METHODS) + " | "
                     + " | ".join(e[f"fit - {m} first"] for m in METHODS[1:]) + " |")  # fmt: skip
    errors = [r for r in report["rows"] if "error" in r]
    if errors:
        lines += ["", "Failed commands:", *[f"- {r['set']} k{r['per_class']} seed {r['seed']} "
                                           f"{r['method']}: {r['error']}" for r in errors]]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--work", help="where sets, runs and the cache go (default: a temp dir)")
    parser.add_argument("--sets", help="comma-separated subset of the sets")
    parser.add_argument("--seeds", type=int, help="how many seeds")
    parser.add_argument("--budgets", help="comma-separated labelled images per class (5,20)")
    parser.add_argument("--minutes", type=float, help="fit's --time-budget")
    parser.add_argument(
        "--rows-from",
        action="append",
        default=[],
        help="fit.json files whose rows count as done (a bench run in parts)",
    )
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.sets:
        cfg["sets"] = args.sets.split(",")
    if args.budgets:
        cfg["budgets"] = [int(k) for k in args.budgets.split(",")]
    if args.seeds:
        cfg["seeds"] = list(range(args.seeds))
    if args.minutes:
        cfg["minutes"] = args.minutes
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_fit_"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for path in args.rows_from for row in json.loads(Path(path).read_text())["rows"]]
    done = {(r["set"], r["per_class"], r["seed"], r["method"]) for r in rows}
    for task_set in cfg["sets"]:
        for per_class in cfg["budgets"]:
            for seed in cfg["seeds"]:
                for method in METHODS:
                    if (task_set, per_class, seed, method) in done:
                        continue
                    row = _one(work, task_set, per_class, seed, method, cfg)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    report = {"config": cfg, "device": "CPU, 2 cores", "rows": rows,
                              "summary": _summary(rows), "primary": PRIMARY}  # fmt: skip
                    (out / "fit.json").write_text(json.dumps(report, indent=1))
                    (out / "fit.md").write_text(_markdown(report))
    return report


if __name__ == "__main__":
    main()
