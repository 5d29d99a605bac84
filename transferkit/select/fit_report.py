"""`fit_report.md` and `fit_report.png`: what `fit` tried, each trial's score and cost, and why
the winner won; `fit_trials.csv` holds the same rows for a notebook."""

from __future__ import annotations

import csv
from pathlib import Path

from transferkit.select.fit_search import SearchResult
from transferkit.select.trials import TrialResult

REPORT, PLOT, TABLE = "fit_report.md", "fit_report.png", "fit_trials.csv"
_COLOURS = {"probe": "tab:blue", "lp-ft": "tab:green", "full": "tab:red"}


def write_report(folder: Path, plan_text: str, result: SearchResult) -> Path:
    """Write the report, its plot and its table into `folder`; returns the report's path."""
    rows = [t.row() for t in result.trials]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (folder / TABLE).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plotted = _plot(folder / PLOT, result)
    winner = result.winner
    lines = [
        f"# fit report: {folder.name}",
        "",
        "## The plan",
        "",
        "```",
        plan_text.rstrip(),
        "```",
        "",
        "## What was tried",
        "",
        f"Budget {result.budget_s / 60:.1f} min, used {result.spent_s / 60:.1f} min "
        f"({len(result.trials)} trials). The score is the mean over the tasks of validation "
        "accuracy (classification) or R^2 (regression), at each trial's best epoch.",
        "",
    ]
    if result.backbones:
        lines += ["Backbones by LogME on the training images' frozen features (higher first):",
                  "", *[f"- {name}: {score:.4f}" for name, score in result.backbones], ""]  # fmt: skip
    lines += ["| trial | method | lr | status | score | best epoch | epochs | seconds |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for trial in result.trials:
        mark = " **(chosen)**" if trial is winner else ""
        score = f"{trial.score:.4f}" if trial.score is not None else "-"
        status = trial.status + (f": {trial.error}" if trial.error else "")
        lines.append(f"| {trial.number}{mark} | {trial.params['method']} | "
                     f"{trial.params['lr']:.2g} | {status} | {score} | "
                     f"{'' if trial.best_epoch is None else trial.best_epoch} | {trial.epochs} | "
                     f"{trial.seconds:.1f} |")  # fmt: skip
    lines += ["", "## Why the winner won", "", *[f"- {r}" for r in result.reasons], "",
              f"The run folder holds the chosen trial's run (trials/{winner.folder.name}); "
              "`plan.yaml` is its recipe.",
              *(["", f"![trials]({PLOT})"] if plotted else [])]  # fmt: skip
    path = folder / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(path: Path, result: SearchResult) -> bool:
    """Each trial's validation score by epoch (dashed: stopped early), and score against
    seconds; a plot that cannot be drawn does not fail the fit."""
    try:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(10, 4))
        curves, costs = figure.subplots(1, 2)
        for trial in result.trials:
            _draw(curves, costs, trial, trial is result.winner)
        curves.set_xlabel("epoch")
        curves.set_ylabel("validation score")
        curves.set_title("trials by epoch (dashed: pruned or out of time)")
        costs.set_xlabel("seconds")
        costs.set_ylabel("score at the best epoch")
        costs.set_title("score and cost (star: chosen)")
        for axis in (curves, costs):
            axis.grid(alpha=0.3)
        handles = {m: c for m, c in _COLOURS.items()}
        for method, colour in handles.items():
            costs.plot([], [], "o", color=colour, label=method)
        costs.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        return True
    except Exception as err:  # noqa: BLE001 - matplotlib or file errors: say so and go on
        print(f"warning: {path} not drawn: {type(err).__name__}: {err}")
        return False


def _draw(curves, costs, trial: TrialResult, chosen: bool) -> None:
    colour = _COLOURS.get(trial.params["method"], "tab:grey")
    if trial.curve:
        style = "-" if trial.status == "complete" else "--"
        curves.plot(range(len(trial.curve)), trial.curve, style, color=colour,
                    linewidth=2.5 if chosen else 1, alpha=0.9)  # fmt: skip
    if trial.score is not None:
        costs.plot([trial.seconds], [trial.score], "*" if chosen else "o", color=colour,
                   markersize=14 if chosen else 6)  # fmt: skip
