"""`transferkit fit DATA` and `tk.fit(DATA)`: the plan (`fit_plan.py`), printed; the measured
choices within the time budget (`fit_search.py`: the backbone, then trials of the method and
rate); the chosen trial's run copied into the run folder, its recipe written as `plan.yaml`
(`transferkit train plan.yaml` trains the same run again) and the report
(`fit_report.md`, `fit_report.png`, `fit_trials.csv`). `--dry-run` stops after the plan;
`search=False` (`--no-search`) trains the plain defaults the plan states."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from transferkit.errors import UserError
from transferkit.recipes import recipe_to_dict, resolve_recipe
from transferkit.rundir import RunDir
from transferkit.select.fit_defaults import DEFAULT_BUDGET_MINUTES
from transferkit.select.fit_defaults import FIT_METHODS as METHODS
from transferkit.select.fit_plan import Plan, make_plan, save_data_objects
from transferkit.select.fit_search import (
    OFFLINE_CANDIDATES,
    SearchResult,
    choose_backbone,
    fixed_by_overrides,
    search,
)

PLAN = "plan.yaml"
_NOT_COPIED = ("trials", "data", ".lock")


@dataclass
class FitResult:
    plan: Plan
    run_dir: RunDir
    trained: bool
    search: SearchResult | None = None


def fit(
    data: str | Path,
    output: str | Path | None = None,
    *,
    dry_run: bool = False,
    tasks: dict[str, str] | None = None,
    ignore: tuple[str, ...] = (),
    image_column: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    overwrite: bool = False,
    device: str | None = None,
    time_budget: float = DEFAULT_BUDGET_MINUTES,
    methods: tuple[str, ...] = METHODS,
    backbones: list[str] | None = None,
    max_trials: int | None = None,
    search_choices: bool = True,
) -> FitResult:
    """Plan, search and train a model for `data`; `overrides` (`key=value`) change the plan's
    recipe and fix what they name; `time_budget` is in minutes."""
    started = time.monotonic()  # the budget counts the plan and the backbone choice too
    _check_choices(time_budget, methods, max_trials)
    if not isinstance(data, (str, Path)):  # a Dataset, a DatasetDict or (image, labels) pairs
        folder = RunDir(output or Path("runs") / "data_fit")
        if not dry_run:
            _check_folder(folder, overwrite)
        data = save_data_objects(data, folder.path / "data")
    plan = make_plan(data, tasks=tasks, ignore=tuple(ignore), image_column=image_column)
    folder = RunDir(output or Path("runs") / f"{plan.recipe['name']}_fit")
    overrides = list(overrides)
    resolved = resolve_recipe(plan.recipe, overrides, where="the fit plan")  # fails early
    base = recipe_to_dict(resolved.written)
    if not dry_run:
        _check_folder(folder, overwrite)
    scores: list[tuple[str, float]] = []
    if search_choices and not any(o.startswith("model.backbone=") for o in overrides):
        candidates = list(backbones or OFFLINE_CANDIDATES)
        model, scores, skipped = choose_backbone(base, candidates, device)
        base["model"].update(model)
        plan.reasons.append(_backbone_reason(model["backbone"], scores, skipped))
    print(plan.text(), end="")
    folder.path.mkdir(parents=True, exist_ok=True)
    _write_plan(folder, base)
    if search_choices:
        print(f"  - search: {', '.join(methods)} and the learning rate, within "
              f"{time_budget:g} min (--time-budget); the defaults are kept unless beaten "
              "beyond the noise")  # fmt: skip
    if dry_run:
        return FitResult(plan, folder, False)
    if not search_choices:
        from transferkit.engine import train

        train(resolve_recipe(base, where="the fit plan"), output=str(folder.path),
              overwrite=True, device=device)  # fmt: skip
        return FitResult(plan, folder, True)
    kinds = {name: task["kind"] for name, task in base["tasks"].items()}
    split_rows = _split_rows(base)
    found = search(base, folder.path, kinds, budget_minutes=time_budget, methods=tuple(methods),
                   fixed=fixed_by_overrides(overrides), max_trials=max_trials,
                   split_rows=split_rows, device=device, started=started)  # fmt: skip
    found.backbones = scores
    _adopt(folder, found)
    from transferkit.select.fit_report import write_report

    report = write_report(folder.path, plan.text(), found)
    print(f"fit: chose trial {found.winner.number} ({found.winner.params['method']}, lr "
          f"{found.winner.params['lr']:.2g}): {found.reasons[0]}\n"
          f"fit: report {report}; model and plan.yaml in {folder.path}")  # fmt: skip
    return FitResult(plan, folder, True, found)


def _check_choices(time_budget: float, methods: tuple[str, ...], max_trials: int | None) -> None:
    if not time_budget > 0:
        raise UserError(f"--time-budget {time_budget}: give minutes above 0 (or --no-search)")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {','.join(methods)}: choose among {', '.join(METHODS)}")
    if max_trials is not None and max_trials < 1:
        raise UserError(f"--max-trials {max_trials}: give at least 1")


def _check_folder(folder: RunDir, overwrite: bool) -> None:
    if folder.holds_run() or (folder.path / "trials").exists():
        if not overwrite:
            raise UserError(f"run folder {folder.path} already holds a fit; choose another "
                            "--output, or start afresh with --overwrite (which clears it)")  # fmt: skip
        folder.clear()
        for kept in ("trials", "data"):  # what RunDir.clear does not know of
            shutil.rmtree(folder.path / kept, ignore_errors=True)


def _backbone_reason(chosen: str, scores: list, skipped: list) -> str:
    left_out = "; left out: " + ", ".join(f"{c} ({why})" for c, why in skipped) if skipped else ""
    if not scores:
        return f"backbone {chosen}: the only candidate whose weights load{left_out}"
    ranked = ", ".join(f"{name} {score:.3f}" for name, score in scores)
    return f"backbone {chosen}: highest LogME on the training images' features ({ranked}){left_out}"


def _split_rows(base: dict) -> tuple[int, int]:
    """(train, validation) rows as the run will split them, for the time estimates."""
    from transferkit.data import load_data

    recipe = resolve_recipe(base, where="the fit plan").recipe
    splits = load_data(recipe.data, recipe.tasks, recipe.seed).splits
    return len(splits["train"]), len(splits["validation"])


def _write_plan(folder: RunDir, recipe: dict) -> None:
    (folder.path / PLAN).write_text(
        "# Written by `transferkit fit`; train it again with:\n"
        f"#   transferkit train {folder.path / PLAN} --output OTHER_FOLDER\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    print(f"plan written to {folder.path / PLAN}")


def _adopt(folder: RunDir, found: SearchResult) -> None:
    """The chosen trial's run becomes the fit folder's run; the other trials keep their
    records and metrics but not their checkpoints (disk)."""
    winner = found.winner.folder
    shutil.copytree(winner, folder.path, dirs_exist_ok=True,
                    ignore=lambda _dir, names: [n for n in names if n in _NOT_COPIED])  # fmt: skip
    recipe = yaml.safe_load(RunDir(winner).recipe_path.read_text())
    _write_plan(folder, recipe)
    for trial in found.trials:
        if trial.folder != winner:
            shutil.rmtree(RunDir(trial.folder).checkpoints_dir, ignore_errors=True)
