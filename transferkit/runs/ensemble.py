"""Ensembles of finished runs: averaged predictions, and weight-averaged "soups".

`transferkit ensemble RUN_DIR... --eval` compares each member with the ensemble (probabilities
averaged for classification, values for regression) per task; `--predict IMAGES` predicts with
the ensemble; `--soup` adds a model whose weights are the average of the members' (a model soup,
Wortsman et al. 2022), which needs one architecture and one starting point. `--soup greedy` is
the paper's greedy soup: members ordered by their own score on the split, each added only if
the soup's score improves (`soups.py`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from transferkit.core import LOWER_IS_BETTER, MEAN_SCORE, score_metric
from transferkit.data import TaskImageDataset, collate
from transferkit.engine import (
    compute_metrics,
    mean_score,
    task_metrics,
    update_metrics,
)
from transferkit.errors import UserError
from transferkit.inference import Run, describe_prediction
from transferkit.inference import load as load_run
from transferkit.models import probabilities
from transferkit.rundir import RunDir
from transferkit.runs.evaluate import check_tasks, eval_split
from transferkit.runs.soups import greedy_path, greedy_path_table


def _load_members(run_dirs: list[str | Path]) -> list[Run]:
    """Load runs and check that they predict the same tasks with the same classes."""
    if len(run_dirs) < 2:
        raise UserError("an ensemble needs at least two run folders")
    runs = [load_run(d) for d in run_dirs]
    for run_dir, run in zip(run_dirs[1:], runs[1:]):
        check_tasks(Path(run_dir), run.tasks, runs[0].tasks, what=f"{run_dirs[0]}")
        check_tasks(Path(run_dirs[0]), runs[0].tasks, run.tasks, what=f"{run_dir}")
    return runs


def _check_soupable(run_dirs: list[str | Path], runs: list[Run]) -> None:
    """A clear error unless the runs share the architecture and the starting point."""
    first = runs[0].info
    starts = []
    for run_dir in run_dirs:
        recipe = RunDir(run_dir).recipe()
        # Runs from the same weights file start at the same point; from random weights, only
        # when the seed is the same too.
        starts.append((recipe.model.weights, recipe.seed if recipe.model.weights is None else None))
    for run_dir, run, start in zip(run_dirs, runs, starts):
        if (run.info.backbone, run.info.model_kwargs) != (first.backbone, first.model_kwargs):
            raise UserError(
                f"--soup: {run_dir} has backbone {run.info.backbone}, {run_dirs[0]} has {first.backbone}"
            )
        if start != starts[0]:
            raise UserError(
                f"--soup: {run_dir} started from {start[0] or 'random weights'} (seed {start[1]}), "
                f"{run_dirs[0]} from {starts[0][0] or 'random weights'} (seed {starts[0][1]}); "
                "averaging weights only makes sense for fine-tunes of one starting point"
            )


def _average_into(target: Run, runs: list[Run]) -> Run:
    """`target` (a loaded copy of a member) with the average of the runs' weights."""
    states = [run.model.state_dict() for run in runs]
    averaged = {
        key: torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        if value.is_floating_point()
        else value  # counters (batches seen by a norm layer): the first member's
        for key, value in states[0].items()
    }
    target.model.load_state_dict(averaged)
    return target


def soup(run_dirs: list[str | Path], runs: list[Run]) -> Run:
    """Average the members' weights: the runs must share the architecture and starting point."""
    _check_soupable(run_dirs, runs)
    return _average_into(load_run(run_dirs[0]), runs)


@torch.no_grad()
def _probabilities(run: Run, images: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = run.model.eval()(images)
    return {name: probabilities(task, outputs[name]) for name, task in run.tasks.items()}


def evaluate_ensemble(
    run_dirs: list[str],
    split: str = "validation",
    data: str | None = None,
    with_soup: bool | str = False,
    save_soup: str | Path | None = None,
) -> dict:
    """Per task and metric: each member's value, the ensemble's, and a soup's if asked.

    `with_soup`: True or "uniform" adds "soup", the average of all members' weights; "greedy"
    adds "greedy soup" (`soups.py`) and, under "greedy path", the metric it went by, the
    ingredients, and the steps: the members in the order tried with their score, the soup's
    with them and whether they went in (`greedy_path_table`). `save_soup`: a folder to
    write the soup to as a model folder (`transferkit eval`, `predict` and `export` read it).
    """
    kind = {True: "uniform", False: None}.get(with_soup, with_soup)  # type: ignore[arg-type]
    if kind not in (None, "uniform", "greedy"):
        raise UserError(f"--soup {with_soup}: use uniform or greedy")
    if save_soup is not None and kind is None:
        raise UserError("--save-soup needs --soup (uniform or greedy)")
    if save_soup is not None and any(Path(save_soup).resolve() == Path(d).resolve()
                                     for d in run_dirs):  # fmt: skip
        raise UserError("--save-soup must be another folder than the members': it would "
                        "replace a member's model")  # fmt: skip
    runs = _load_members(run_dirs)
    if kind:
        _check_soupable(run_dirs, runs)
    members = {str(d): r for d, r in zip(run_dirs, runs)}
    if kind == "uniform":
        members["soup"] = _average_into(load_run(run_dirs[0]), runs)
    recipe, rows, specs = eval_split(RunDir(run_dirs[0]), split, data)
    if data is None:
        _warn_if_splits_differ(run_dirs)
    check_tasks(Path(run_dirs[0]), runs[0].tasks, specs)
    evaluate = _Evaluator(rows, runs[0].tasks, recipe)
    results = evaluate(members, ensemble=True)
    soup_run, ingredients = (members.get("soup"), [str(d) for d in run_dirs])
    if kind == "greedy":
        soup_run, ingredients, results["greedy soup"], results["greedy path"] = _greedy(
            run_dirs, runs, results, evaluate
        )
    if save_soup is not None:
        _save_soup(soup_run, RunDir(run_dirs[0]), kind, ingredients, Path(save_soup))
    return results


class _Evaluator:
    """Metrics of runs on one split, every run fed the same rows in step."""

    def __init__(self, rows, tasks: dict, recipe) -> None:
        self.rows, self.tasks, self.recipe = rows, tasks, recipe
        self.batch_size = recipe.train.eval_batch_size or recipe.train.batch_size or 64

    def __call__(self, members: dict[str, Run], ensemble: bool = False) -> dict:
        tasks = self.tasks
        # One loader per member, as members may preprocess differently; unshuffled, so in step.
        loaders = [
            DataLoader(
                TaskImageDataset(
                    self.rows,
                    list(tasks.values()),
                    run.transform,
                    bad_images=self.recipe.data.bad_images,
                ),
                batch_size=self.batch_size,
                collate_fn=collate,
            )  # fmt: skip
            for run in members.values()
        ]
        names = [*members, "ensemble"] if ensemble else list(members)
        collections = {who: {t: task_metrics(spec) for t, spec in tasks.items()} for who in names}
        for batches in zip(*loaders):
            targets, masks = batches[0]["targets"], batches[0]["mask"]
            predictions = {
                who: _probabilities(run, batch["image"])
                for (who, run), batch in zip(members.items(), batches)
            }
            if ensemble:
                voters = [p for who, p in predictions.items() if who != "soup"]
                predictions["ensemble"] = {
                    t: torch.stack([p[t] for p in voters]).mean(0) for t in tasks
                }
            for who, values in predictions.items():
                for t, spec in tasks.items():
                    update_metrics(collections[who][t], spec, values[t], targets[t], masks[t],
                                   are_probabilities=True)  # fmt: skip
        return {
            who: {t: compute_metrics(c) for t, c in per_task.items()}
            for who, per_task in collections.items()
        }


def _greedy(run_dirs, runs: list[Run], results: dict, evaluate: _Evaluator):
    """The greedy soup's run, its ingredients, its metrics and the path taken."""
    first = runs[0]
    by, value, lower = _ranking(first, results[str(run_dirs[0])], evaluate.recipe.train)
    scratch = load_run(run_dirs[0])
    tried: dict[tuple[int, ...], dict] = {}

    def score_of(indices: list[int]) -> float:
        _average_into(scratch, [runs[i] for i in indices])
        tried[tuple(indices)] = evaluate({"candidate": scratch})["candidate"]
        return value(tried[tuple(indices)])

    names = [str(d) for d in run_dirs]
    alone = [value(results[name]) for name in names]
    chosen, path = greedy_path(names, alone, score_of, lower_is_better=lower)
    metrics = tried.get(tuple(chosen), results[names[chosen[0]]])
    _average_into(scratch, [runs[i] for i in chosen])
    report = {"by": by, "lower_is_better": lower,
              "ingredients": [names[i] for i in chosen], "steps": [asdict(s) for s in path]}  # fmt: skip
    return scratch, report["ingredients"], metrics, report


def _ranking(first: Run, metrics: dict, train) -> tuple[str, Callable[[dict], float], bool]:
    """What the greedy soup ranks by: the first run's monitored metric (`TASK/METRIC`, or the
    tasks' accuracy and R^2 averaged for `val/mean_score`), else the first task's first metric;
    `metrics`: {task: {metric: value}}. Returns its name, how to read it, lower is better."""
    watched = first.info.monitor or f"val/{next(iter(first.tasks))}/accuracy"
    if watched.endswith(f"/{MEAN_SCORE}"):
        scored = {name: score_metric(task.kind) for name, task in first.tasks.items()}

        def mean(found: dict) -> float:
            return mean_score({f"val/{t}/{m}": v for t, ms in found.items() for m, v in ms.items()},
                              first.tasks, "val")  # fmt: skip

        if all(m in metrics.get(t, {}) for t, m in scored.items()):
            return MEAN_SCORE, mean, False
    task, metric = (watched.split("/") + ["", ""])[1:3]
    if metric not in metrics.get(task, {}):
        task = next(iter(first.tasks))
        metric = next(iter(metrics[task]))
    lower = metric in LOWER_IS_BETTER or train.monitor_mode == "min"
    return f"{task}/{metric}", lambda found: found[task][metric], lower


def _save_soup(run: Run, first: RunDir, kind: str, ingredients: list[str], path: Path) -> None:
    """The soup as a model folder, with the first member's recipe (so `eval` works too)."""
    target = RunDir(path)
    target.path.mkdir(parents=True, exist_ok=True)
    soup_info = {"kind": kind, "ingredients": ingredients}
    target.save_model(run.model.cpu(), dataclasses.replace(run.info, soup=soup_info))
    shutil.copyfile(first.recipe_path, target.recipe_path)


def _warn_if_splits_differ(run_dirs: list[str]) -> None:
    """Members whose data or carving seed differ may have trained on this validation split."""
    first = RunDir(run_dirs[0]).recipe()
    for run_dir in run_dirs[1:]:
        other = RunDir(run_dir).recipe()
        carved = first.data.val_split is None
        if other.data != first.data or (carved and other.seed != first.seed):
            print(
                f"warning: {run_dir} was trained with other data or another seed for carving the "
                f"validation split than {run_dirs[0]}; some of these validation rows may be in its "
                "training data. Evaluate on held-out data with --data."
            )


def predict_ensemble(run_dirs: list[str], images: list) -> list[dict]:
    """Average the members' predictions for PIL images; per image and task, like `predict`."""
    runs = _load_members(run_dirs)
    tasks = runs[0].tasks
    per_run = [
        _probabilities(run, torch.stack([run.transform(i.convert("RGB")) for i in images]))
        for run in runs
    ]
    averaged = {t: torch.stack([p[t] for p in per_run]).mean(0) for t in tasks}
    return [
        {t: describe_prediction(spec, averaged[t][i]) for t, spec in tasks.items()}
        for i in range(len(images))
    ]


def ensemble_report(results: dict) -> str:
    """A markdown table: one row per member (and the ensemble, the soup), one column per metric;
    after it, a greedy soup's path."""
    models = {who: per_task for who, per_task in results.items() if who != "greedy path"}
    columns = [(t, m) for t, metrics in next(iter(models.values())).items() for m in metrics]
    lines = [
        "| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for who, per_task in models.items():
        lines.append(f"| {who} | " + " | ".join(f"{per_task[t][m]:.4f}" for t, m in columns) + " |")
    if "greedy path" in results:
        lines += ["", greedy_path_table(results["greedy path"])]
    return "\n".join(lines) + "\n"


def write_ensemble_report(results: dict, output: Path) -> None:
    """ensemble_report.md and .json in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "ensemble_report.md").write_text(ensemble_report(results))
    (output / "ensemble_report.json").write_text(json.dumps(results, indent=2))
