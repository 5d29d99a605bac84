"""The tables of `make bench-quality` (bench/quality.py), from its rows: one dict per run with
`method`, `budget`, `seed`, `accuracy` (the last epoch's) and `trace` (every epoch's)."""

from __future__ import annotations

import statistics


def summary(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def mean_std(cell: dict) -> str:
    """A `summary` as a table cell."""
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def budget_table(rows: list) -> tuple[list, str]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    cells, lines = [], []
    lines.append("| method | " + " | ".join(f"{b} / class" for b in budgets) + " | s per run |")
    lines.append("|---" * (len(budgets) + 2) + "|")
    for method in methods:
        line = f"| {method} |"
        for budget in budgets:
            acc = [r["accuracy"] for r in rows if r["method"] == method and r["budget"] == budget]
            cell = {"method": method, "budget": budget, **summary(acc)}
            cells.append(cell)
            line += f" {mean_std(cell)} |"
        seconds = [r["s"] for r in rows if r["method"] == method]
        lines.append(line + f" {statistics.fmean(seconds):.0f} |")
    return cells, "\n".join(lines)


def paired_table(rows: list, method: str, baseline: str) -> str:
    """`method` against `baseline` on the same draws (budget, seed): the mean difference in
    points, its standard error, and on how many draws `method` is ahead, tied or behind."""
    loop = {(r["budget"], r["seed"]): r["accuracy"] for r in rows if r["method"] == baseline}
    lines = [f"| labels/class | seeds | {method} - {baseline}, points | std. error | "
             "ahead / tied / behind |", "|---|---|---|---|---|"]  # fmt: skip
    for budget in sorted({r["budget"] for r in rows}):
        diffs = [100 * (r["accuracy"] - loop[(budget, r["seed"])]) for r in rows
                 if r["method"] == method and r["budget"] == budget
                 and (budget, r["seed"]) in loop]  # fmt: skip
        if len(diffs) < 2:
            continue
        error = statistics.stdev(diffs) / len(diffs) ** 0.5
        counts = [sum(d > 1e-6 for d in diffs), sum(abs(d) <= 1e-6 for d in diffs),
                  sum(d < -1e-6 for d in diffs)]  # fmt: skip
        lines.append(f"| {budget} | {len(diffs)} | {statistics.fmean(diffs):+.1f} | "
                     f"{error:.1f} | {' / '.join(map(str, counts))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def unfreeze_table(rows: list, probe_epochs: int, methods) -> str:
    """Per LP-FT method and budget, over seeds: validation accuracy at the probe's last epoch,
    the first fine-tune epoch (does it collapse?), the worst fine-tune epoch and the last."""

    def cell(values: list[float]) -> str:
        return mean_std(summary(values))

    lines = [
        "| method | labels/class | seeds | end of probe | 1st fine-tune epoch | worst fine-tune "
        "epoch | final | runs losing > 5 points in the 1st fine-tune epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for row in rows:
        if row["method"] in methods and len(row.get("trace") or ()) > probe_epochs:
            groups.setdefault((row["method"], row["budget"]), []).append(row["trace"])
    for (method, budget), traces in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):
        probe = [t[probe_epochs - 1] for t in traces]
        first = [t[probe_epochs] for t in traces]
        worst = [min(t[probe_epochs:]) for t in traces]
        drops = sum(p - f > 0.05 for p, f in zip(probe, first))
        lines.append(
            f"| {method} | {budget} | {len(traces)} | {cell(probe)} | {cell(first)} | "
            f"{cell(worst)} | {cell([t[-1] for t in traces])} | {drops} of {len(traces)} |"
        )
    return "\n".join(lines) + "\n"


def chain_table(rows: list, variants) -> tuple[list, str]:
    cells, lines = [], ["| variant | digit acc | parity acc | ink MAE |", "|---|---|---|---|"]
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        cell = {"variant": variant}
        for key in ("digit", "parity", "ink_mae"):
            cell[key] = summary([r[key] for r in mine])
        cells.append(cell)
        lines.append(
            f"| {variant} | " + " | ".join(mean_std(cell[k]) for k in cell if k != "variant") + " |"
        )
    return cells, "\n".join(lines)
