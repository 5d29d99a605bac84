"""`transferkit eval RUN_DIR`: the run's final model on one split of its data, or on other data."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from torch.utils.data import DataLoader

from transferkit.data import TaskImageDataset, collate, load_data
from transferkit.engine.run import load_run
from transferkit.engine.trainer import evaluate
from transferkit.errors import UserError
from transferkit.models import TaskSpec
from transferkit.recipes import Recipe, load_recipe

_MANIFESTS = (".csv", ".json", ".jsonl", ".parquet")


def eval_split(run_dir: Path, split: str = "validation", data: str | None = None):
    """The run's recipe and one split of its data (or of `data`, a source with the same columns),
    with the task specs found in that data."""
    overrides = []
    if data:
        saved = (Path(data) / "dataset_info.json").exists() or (
            Path(data) / "dataset_dict.json"
        ).exists()
        source = (
            "manifest" if Path(data).suffix in _MANIFESTS else ("disk" if saved else "imagefolder")
        )
        overrides = [f"data.path={data}", f"data.source={source}"]
    recipe: Recipe = load_recipe(Path(run_dir) / "recipe.yaml", overrides)
    loaded = load_data(recipe.data, recipe.tasks, recipe.seed)
    if split not in loaded.splits:
        raise UserError(f"--split {split}: the data has splits {', '.join(loaded.splits)}")
    return recipe, loaded.splits[split], {t.name: t for t in loaded.tasks}


def check_tasks(
    run_dir: Path, tasks: dict[str, TaskSpec], specs: dict[str, TaskSpec], what: str = "the data"
) -> None:
    """A clear error unless every task of a run has the same kind and classes in `specs`."""
    for name, task in tasks.items():
        found = specs.get(name)
        if not found or (found.kind, found.num_outputs, found.class_names) != (
            task.kind,
            task.num_outputs,
            task.class_names,
        ):
            seen = f"{found.kind}, classes {found.class_names}" if found else "absent"
            raise UserError(
                f"task {name!r} of {run_dir} ({task.kind}, classes {task.class_names}) does not "
                f"match {what} ({seen}); use runs and data with the same tasks and classes"
            )


def evaluate_run(
    run_dir: str | Path, split: str = "validation", data: str | None = None
) -> dict[str, float]:
    """Per-task metrics of a run's model; `data` replaces the recipe's data path (same columns)."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    recipe, rows, specs = eval_split(run_dir, split, data)
    check_tasks(run_dir, run.tasks, specs)
    dataset = TaskImageDataset(
        rows, list(run.tasks.values()), run.transform, bad_images=recipe.data.bad_images
    )
    loader = DataLoader(
        dataset,
        batch_size=recipe.train.eval_batch_size or recipe.train.batch_size,
        collate_fn=collate,
    )
    return evaluate(run.model, loader, run.tasks, Accelerator(cpu=True), prefix=split)
