"""`transferkit fit DATA` and `tk.fit(DATA)`: the plan (`fit_plan.py`), printed and written as
`plan.yaml` into the run folder, then the run it describes; `transferkit train plan.yaml`
trains the same run again. `--dry-run` stops after the plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from transferkit.engine import train
from transferkit.recipes import resolve_recipe
from transferkit.rundir import RunDir
from transferkit.select.fit_plan import Plan, make_plan

PLAN = "plan.yaml"


@dataclass
class FitResult:
    plan: Plan
    run_dir: RunDir
    trained: bool


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
) -> FitResult:
    """Plan and train a model for `data`; `overrides` (`key=value`) change the plan's recipe."""
    plan = make_plan(data, tasks=tasks, ignore=tuple(ignore), image_column=image_column)
    folder = RunDir(output or Path("runs") / f"{plan.recipe['name']}_fit")
    resolved = resolve_recipe(plan.recipe, list(overrides), where="the fit plan")  # fails early
    print(plan.text(), end="")
    folder.path.mkdir(parents=True, exist_ok=True)
    written = {**plan.recipe}
    if overrides:  # the plan as it trains: `train plan.yaml` needs no --set
        from transferkit.recipes import recipe_to_dict

        written = recipe_to_dict(resolved.written)
    (folder.path / PLAN).write_text(
        "# Written by `transferkit fit`; train it again with:\n"
        f"#   transferkit train {folder.path / PLAN} --output OTHER_FOLDER\n"
        + yaml.safe_dump(written, sort_keys=False)
    )
    print(f"plan written to {folder.path / PLAN}")
    if dry_run:
        return FitResult(plan, folder, False)
    train(resolved, output=str(folder.path), overwrite=overwrite, device=device)
    return FitResult(plan, folder, True)
