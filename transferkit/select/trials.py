"""Trials of a search: each one a whole run of a recipe, reported epoch by epoch to an optuna
study whose pruner may stop it early. `fit` searches the method and rate with it, and
`sweep --search` a grid's values.

A trial's score is `fit_score`: the mean over the tasks of validation accuracy
(classification) or R^2 (regression), higher is better whatever the run monitors. A finished
trial scores at its best epoch, the one whose model the run saved. A trial that raises is
recorded as failed with its message and the search goes on (each run's own output is in
`NAME.log` beside its folder); only a stop asked by the user
(Ctrl-C) ends it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transferkit.core import score_metric
from transferkit.errors import Interrupted
from transferkit.recipes import ResolvedRecipe
from transferkit.rundir import RunDir

Sampler = Literal["tpe", "random"]


@dataclass
class TrialResult:
    """One trial: its parameters, its folder, how it ended and what it scored."""

    number: int
    params: dict[str, Any]
    folder: Path
    status: str  # complete, pruned, out of time, failed
    score: float | None = None
    best_epoch: int | None = None
    epochs: int = 0
    seconds: float = 0.0
    curve: list[float] = field(default_factory=list)
    error: str = ""
    record: dict[str, Any] = field(default_factory=dict)  # the scored epoch's
    default: bool = False  # the plain defaults' trial (what `fit` keeps within the noise)

    def row(self) -> dict[str, Any]:
        return {"trial": self.number, **self.params, "status": self.status,
                "score": self.score, "best_epoch": self.best_epoch, "epochs": self.epochs,
                "seconds": round(self.seconds, 1), "error": self.error}  # fmt: skip


def score_parts(record: dict[str, Any], tasks: dict[str, str]) -> list[tuple[float, int]]:
    """Each task's (accuracy or R^2, labelled validation rows) in an epoch's record (`tasks`:
    name -> kind); tasks without a finite value are left out."""
    parts = []
    for name, kind in tasks.items():
        value = record.get(f"val/{name}/{score_metric(kind)}")
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append((float(value), int(record.get(f"val/{name}/count") or 1)))
    return parts


def fit_score(record: dict[str, Any], tasks: dict[str, str]) -> float | None:
    """The mean of each task's accuracy (classification) or R^2 (regression) in an epoch's
    record; None when no task has its value."""
    parts = score_parts(record, tasks)
    return sum(p for p, _ in parts) / len(parts) if parts else None


def make_study(sampler: Sampler, seed: int, warmup_epochs: int, startup_trials: int = 2):
    """An optuna study that maximizes `fit_score`. The median pruner stops a trial whose score
    at an epoch is below the median of earlier trials at that epoch, never before
    `warmup_epochs` (LP-FT is still a probe then, so its curve says little yet)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    chosen = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(startup_trials, 1))
        if sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs
    )
    return optuna.create_study(direction="maximize", sampler=chosen, pruner=pruner)


def run_trial(
    study,
    trial,
    recipe: ResolvedRecipe,
    folder: Path,
    tasks: dict[str, str],
    *,
    deadline: float | None = None,
    device: str | None = None,
) -> TrialResult:
    """Train `recipe` into `folder` as optuna's `trial`, reporting each epoch's score; the run
    ends early when the pruner says so or when `time.monotonic()` passes `deadline`."""
    from optuna.trial import TrialState

    from transferkit.engine import train

    result = TrialResult(trial.number, dict(trial.params), folder, "complete")
    started = time.monotonic()
    epochs = recipe.recipe.train.epochs

    def epoch_end(record: dict[str, Any]) -> bool:
        score = fit_score(record, tasks)
        result.curve.append(score if score is not None else float("nan"))
        if score is not None:
            trial.report(score, record["epoch"])
        if record["epoch"] + 1 >= epochs:  # the last epoch: nothing left to stop
            return False
        if deadline is not None and time.monotonic() > deadline:
            result.status = "out of time"
            return True
        if score is not None and trial.should_prune():
            result.status = "pruned"
            return True
        return False

    folder.parent.mkdir(parents=True, exist_ok=True)
    try:  # the run's own lines go to its log, beside its folder; the search prints one a trial
        with (folder.parent / f"{folder.name}.log").open("w") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # fmt: skip
            train(recipe, output=str(folder), overwrite=True, device=device, epoch_end=epoch_end)
    except (Interrupted, KeyboardInterrupt):
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as err:  # noqa: BLE001 - a failed trial is reported and skipped
        result.status = "failed"
        result.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        result.seconds = time.monotonic() - started
        study.tell(trial, state=TrialState.FAIL)
        return result
    result.seconds = time.monotonic() - started
    records = RunDir(folder).records()
    result.epochs = len(records)
    best = RunDir(folder).summary().get("best_epoch")
    scored = [r for r in records if r["epoch"] == best] or records[-1:]
    result.best_epoch = scored[0]["epoch"] if scored else None
    result.score = fit_score(scored[0], tasks) if scored else None
    result.record = scored[0] if scored else {}
    if result.status == "complete" and result.score is not None:
        study.tell(trial, result.score)
    else:
        study.tell(trial, state=TrialState.PRUNED)
    return result
