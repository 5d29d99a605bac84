"""`transferkit sweep RECIPE --grid key=v1,v2 ...`: every combination, resumable, shareable.

Each combination is one run folder under the sweep folder, trained in its own process (so each
run's peak memory is its own). A run is claimed by creating `claim.json` exclusively, so several
processes, or machines sharing the folder, never train the same combination twice; a finished
run is not redone, and a run whose claimer died is resumed from its
checkpoints. A run counts as finished only once its completion marker is written
(`RunDir.is_complete`): a run killed after its first epoch already has a model, and is resumed.
The report (`report.md`, `report.csv`, one PNG per task) is rewritten after every
run.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from transferkit.errors import UserError
from transferkit.recipes import load_recipe
from transferkit.rundir import RunDir

CLAIM = "claim.json"


def parse_grid(items: list[str]) -> dict[str, list]:
    """`key=v1,v2` (or `key=[v1, "a,b"]` for values with commas) -> {key: [values]}."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise UserError(f"--grid {item!r}: write KEY=V1,V2,... (e.g. train.lr=0.01,0.001)")
        raw = raw.strip()
        try:
            values = (
                yaml.safe_load(raw)
                if raw.startswith("[")
                else [yaml.safe_load(v) for v in raw.split(",")]
            )
        except yaml.YAMLError as err:
            raise UserError(f"--grid {item!r}: cannot read the values ({err.problem})") from None
        if not isinstance(values, list) or not values:
            raise UserError(f"--grid {item!r}: give at least one value")
        grid[key.strip()] = values
    return grid


def combinations(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid, in a stable order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def run_name(index: int, combo: dict) -> str:
    """A readable, filesystem-safe folder name: 003_lr=0.001_freeze=up_to-layer2."""
    parts = [f"{key.split('.')[-1]}={value}" for key, value in combo.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", f"{index:03d}_" + "_".join(parts))[:120]


def _overrides(combo: dict) -> list[str]:
    # JSON is YAML: the recipe reads the value back with its type (strings stay quoted).
    return [f"{key}={json.dumps(value)}" for key, value in combo.items()]


def _claim(run_dir: Path) -> bool:
    """Claim a run for this process; a claim whose process died on this host is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CLAIM
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                return False  # being written right now by its owner
            if owner.get("host") == me["host"] and not _alive(owner.get("pid", -1)):
                path.unlink(missing_ok=True)  # its process died: take it over
                continue
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(
    recipe_path: str, grid: dict[str, list], output: str | None = None, overrides: list[str] = ()
) -> Path:
    """Run every combination not done yet; returns the sweep folder (with the report)."""
    from tqdm.auto import tqdm

    base = load_recipe(recipe_path, overrides)
    combos = combinations(grid)
    for combo in combos:  # validate every combination before training anything
        load_recipe(recipe_path, [*overrides, *_overrides(combo)])
    root = Path(output) if output else Path(base.output_dir) / f"{base.name}_sweep"
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(
        json.dumps(
            {"recipe": str(recipe_path), "grid": grid, "overrides": list(overrides)}, indent=2
        )
    )
    bar = tqdm(list(enumerate(combos)), desc="sweep", unit="run")
    for index, combo in bar:
        run_dir = root / run_name(index, combo)
        if RunDir(run_dir).is_complete():
            continue
        if not _claim(run_dir):
            continue  # another process has it
        bar.set_postfix_str(run_dir.name)
        resume = (
            ["--resume", str(run_dir)]
            if RunDir(run_dir).checkpoints()
            else ["--output", str(run_dir)]
        )
        cmd = [sys.executable, "-m", "transferkit.cli", "train", str(recipe_path), *resume]
        for item in [*overrides, *_overrides(combo)]:
            cmd += ["--set", item]
        log = (run_dir / "train.log").open("a")
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        (run_dir / "combination.json").write_text(json.dumps(combo))
        if result.returncode != 0:
            print(
                f"run {run_dir.name} failed (exit {result.returncode}); see {run_dir / 'train.log'}"
            )
            (run_dir / CLAIM).unlink(missing_ok=True)
        _write_report(root, grid)
    _write_report(root, grid)
    return root


def _collect(root: Path, grid: dict[str, list]) -> list[dict]:
    """One row per finished run: its combination, final metrics, size, speed and memory."""
    rows = []
    for index, combo in enumerate(combinations(grid)):
        run_dir = RunDir(root / run_name(index, combo))
        records = run_dir.records()
        if not run_dir.is_complete() or not records:
            continue
        last = records[-1]
        row = {"run": run_dir.path.name, **combo}
        row.update(
            {k: v for k, v in last.items() if k.startswith("val/") and not k.endswith("/count")}
        )
        row["trainable_groups"] = last.get("trainable_groups")
        row["trainable_params"] = last.get("trainable_params")
        row["s_per_epoch"] = round(sum(r["epoch_time_s"] for r in records) / len(records), 3)
        row["peak_memory_mb"] = max(r.get("peak_memory_mb", 0) for r in records)
        rows.append(row)
    return rows


def _write_report(root: Path, grid: dict[str, list]) -> list[dict]:
    """report.md, report.csv and report_<metric>.png (metric against trainable groups)."""
    rows = _collect(root, grid)
    if not rows:
        return rows
    write_table(root, rows, f"# Sweep {root.name}\n\n{len(rows)} runs done.")
    _plots(root, rows, grid)
    return rows


def write_table(root: Path, rows: list[dict], heading: str) -> None:
    """`report.csv` and `report.md` (the heading, then the rows as a table) in `root`."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (root / "report.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    (root / "report.md").write_text(heading + "\n\n" + "\n".join(lines) + "\n")


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def _plots(root: Path, rows: list[dict], grid: dict[str, list]) -> None:
    # A bare Figure draws without pyplot, so a notebook's plotting backend is left alone.
    from matplotlib.figure import Figure

    metrics = [
        k
        for k in rows[0]
        if k.startswith("val/") and k.rsplit("/", 1)[-1] in ("accuracy", "mae", "r2")
    ]
    # One line per setting of the keys other than the freeze spec, which sets the x axis.
    others = [k for k in grid if not k.endswith(".freeze")]
    for metric in metrics:
        figure = Figure(figsize=(6, 4))
        axis = figure.subplots()
        lines: dict[str, list] = {}
        for row in rows:
            label = ", ".join(f"{k.split('.')[-1]}={row[k]}" for k in others) or "runs"
            lines.setdefault(label, []).append((row["trainable_groups"], row[metric]))
        for label, points in sorted(lines.items()):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axis.set_xlabel("trainable backbone groups (last phase)")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} against freeze depth")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(root / f"report_{metric.replace('/', '_')}.png", dpi=100)
