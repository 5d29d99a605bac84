"""`transferkit sweep RECIPE --grid KEY=V1,V2 ... --search tpe|random --trials N`: instead of every
combination, N trials whose values optuna's sampler draws from the grid (TPE learns from the
scores so far; random does not), each pruned by the median pruner on its validation curve.

Trials run in this process, one after another, into `SWEEP/NNN_key=value...`; the same
combination is never trained twice (a repeat draw is told its earlier score and not counted).
The score is `fit_score` (select/trials.py). `report.md` and `report.csv` list every trial,
best first, rewritten after each.
"""

from __future__ import annotations

import json
from pathlib import Path

from transferkit.recipes import load_recipe, resolve_recipe
from transferkit.select.grid_sweep import run_name, write_table
from transferkit.select.trials import Sampler, TrialResult, make_study, run_trial

_DRAWS_PER_TRIAL = 10  # draws before giving up on finding a combination not tried yet


def search_sweep(
    recipe_path: str,
    grid: dict[str, list],
    sampler: Sampler,
    trials: int,
    output: str | None = None,
    overrides: list[str] = (),
    device: str | None = None,
) -> Path:
    """Run `trials` sampled combinations of `grid`; returns the sweep folder."""
    from optuna.distributions import CategoricalDistribution

    base = load_recipe(recipe_path, list(overrides))
    encoded = {key: [json.dumps(v) for v in values] for key, values in grid.items()}
    for key, values in grid.items():  # every value is checked before anything trains
        for value in values:
            load_recipe(recipe_path, [*overrides, f"{key}={json.dumps(value)}"])
    root = Path(output) if output else Path(base.output_dir) / f"{base.name}_sweep"
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"recipe": str(recipe_path), "grid": grid,
        "search": sampler, "trials": trials, "overrides": list(overrides)}, indent=2))  # fmt: skip
    tasks = {name: task.kind for name, task in base.tasks.items()}
    study = make_study(sampler, base.seed, warmup_epochs=base.train.epochs // 2)
    distributions = {key: CategoricalDistribution(v) for key, v in encoded.items()}
    done: dict[str, TrialResult] = {}
    for _ in range(trials * _DRAWS_PER_TRIAL):
        if len(done) >= trials:
            break
        trial = study.ask(distributions)
        combo = {key: json.loads(trial.params[key]) for key in grid}
        key = json.dumps(combo, sort_keys=True)
        if key in done:  # a repeat: the sampler learns the earlier score, nothing trains
            if done[key].score is None:
                from optuna.trial import TrialState

                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, done[key].score)
            continue
        folder = root / run_name(len(done), combo)
        recipe = resolve_recipe(recipe_path, [*overrides, *[f"{k}={json.dumps(v)}"
                                                            for k, v in combo.items()]])  # fmt: skip
        print(f"sweep: trial {len(done)}: {combo}")
        result = run_trial(study, trial, recipe, folder, tasks, device=device)
        result.params = combo
        done[key] = result
        print(
            f"sweep: trial {len(done) - 1}: {result.status}"
            + (f", score {result.score:.4f}" if result.score is not None else f" ({result.error})")
        )
        _write_report(root, list(done.values()), sampler)
    return root


def _write_report(root: Path, results: list[TrialResult], sampler: str) -> None:
    ranked = sorted(results, key=lambda r: (r.score is None, -(r.score or 0.0)))
    write_table(root, [{"run": r.folder.name, **r.row()} for r in ranked],
                f"# Sweep {root.name} ({sampler} search)\n\n{len(ranked)} trials, best first. "
                "The score: mean validation accuracy (classification) or R^2 (regression) over "
                "the tasks, at each run's best epoch.")  # fmt: skip
