"""Ensembles of finished runs: averaged predictions, and weight-averaged "soups".

`transferkit ensemble RUN_DIR... --eval` compares each member with the ensemble (probabilities
averaged for classification, values for regression) per task; `--predict IMAGES` predicts with
the ensemble; `--soup` adds a model whose weights are the average of the members' (a model soup,
Wortsman et al. 2022), which needs one architecture and one starting point.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from transferkit.data import TaskImageDataset, collate
from transferkit.engine import compute_metrics, task_metrics, update_metrics
from transferkit.errors import UserError
from transferkit.inference import Run, describe_prediction
from transferkit.inference import load as load_run
from transferkit.models import probabilities
from transferkit.rundir import RunDir
from transferkit.runs.evaluate import check_tasks, eval_split


def _load_members(run_dirs: list[str | Path]) -> list[Run]:
    """Load runs and check that they predict the same tasks with the same classes."""
    if len(run_dirs) < 2:
        raise UserError("an ensemble needs at least two run folders")
    runs = [load_run(d) for d in run_dirs]
    for run_dir, run in zip(run_dirs[1:], runs[1:]):
        check_tasks(Path(run_dir), run.tasks, runs[0].tasks, what=f"{run_dirs[0]}")
        check_tasks(Path(run_dirs[0]), runs[0].tasks, run.tasks, what=f"{run_dir}")
    return runs


def soup(run_dirs: list[str | Path], runs: list[Run]) -> Run:
    """Average the members' weights: the runs must share the architecture and starting point."""
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
    soup_run = load_run(run_dirs[0])
    states = [run.model.state_dict() for run in runs]
    averaged = {
        key: torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        if value.is_floating_point()
        else value
        for key, value in states[0].items()
    }
    soup_run.model.load_state_dict(averaged)
    return soup_run


@torch.no_grad()
def _probabilities(run: Run, images: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = run.model.eval()(images)
    return {name: probabilities(task, outputs[name]) for name, task in run.tasks.items()}


def evaluate_ensemble(
    run_dirs: list[str], split: str = "validation", data: str | None = None, with_soup: bool = False
) -> dict:
    """Per task and metric: each member's value, the ensemble's, and the soup's if asked."""
    runs = _load_members(run_dirs)
    members = {str(d): r for d, r in zip(run_dirs, runs)}
    if with_soup:
        members["soup"] = soup(run_dirs, runs)
    recipe, rows, specs = eval_split(RunDir(run_dirs[0]), split, data)
    if data is None:
        _warn_if_splits_differ(run_dirs)
    tasks = runs[0].tasks
    check_tasks(Path(run_dirs[0]), tasks, specs)
    batch_size = recipe.train.eval_batch_size or recipe.train.batch_size or 64
    # One loader per member, as members may preprocess differently; unshuffled, so in step.
    loaders = [
        DataLoader(
            TaskImageDataset(
                rows, list(tasks.values()), run.transform, bad_images=recipe.data.bad_images
            ),
            batch_size=batch_size,
            collate_fn=collate,
        )  # fmt: skip
        for run in members.values()
    ]
    collections = {
        who: {t: task_metrics(spec) for t, spec in tasks.items()} for who in [*members, "ensemble"]
    }
    for batches in zip(*loaders):
        targets, masks = batches[0]["targets"], batches[0]["mask"]
        predictions = {
            who: _probabilities(run, batch["image"])
            for (who, run), batch in zip(members.items(), batches)
        }
        voters = [p for who, p in predictions.items() if who != "soup"]
        predictions["ensemble"] = {t: torch.stack([p[t] for p in voters]).mean(0) for t in tasks}
        for who, values in predictions.items():
            for t, spec in tasks.items():
                update_metrics(
                    collections[who][t],
                    spec,
                    values[t],
                    targets[t],
                    masks[t],
                    are_probabilities=True,
                )
    return {
        who: {t: compute_metrics(c) for t, c in per_task.items()}
        for who, per_task in collections.items()
    }


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
    """A markdown table: one row per member (and the ensemble, the soup), one column per metric."""
    columns = [(t, m) for t, metrics in next(iter(results.values())).items() for m in metrics]
    lines = [
        "| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for who, per_task in results.items():
        lines.append(f"| {who} | " + " | ".join(f"{per_task[t][m]:.4f}" for t, m in columns) + " |")
    return "\n".join(lines) + "\n"


def write_ensemble_report(results: dict, output: Path) -> None:
    """ensemble_report.md and .json in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "ensemble_report.md").write_text(ensemble_report(results))
    (output / "ensemble_report.json").write_text(json.dumps(results, indent=2))
