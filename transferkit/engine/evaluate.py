"""`transferkit eval RUN_DIR`: the run's final model on one split of its data, or on other data."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from torch.utils.data import DataLoader

from transferkit.data import TaskImageDataset, collate, load_data
from transferkit.engine.run import load_run
from transferkit.engine.trainer import evaluate
from transferkit.errors import UserError
from transferkit.recipes import load_recipe


def evaluate_run(
    run_dir: str | Path, split: str = "validation", data: str | None = None
) -> dict[str, float]:
    """Per-task metrics of a run's model; `data` replaces the recipe's data path (same columns)."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    overrides = []
    if data:
        source = (
            "manifest"
            if Path(data).suffix in (".csv", ".json", ".jsonl", ".parquet")
            else (
                "disk"
                if (Path(data) / "dataset_info.json").exists()
                or (Path(data) / "dataset_dict.json").exists()
                else "imagefolder"
            )
        )
        overrides = [f"data.path={data}", f"data.source={source}"]
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    loaded = load_data(recipe.data, recipe.tasks, recipe.seed)
    if split not in loaded.splits:
        raise UserError(f"--split {split}: the data has splits {', '.join(loaded.splits)}")
    specs = {t.name: t for t in loaded.tasks}
    for name, task in run.tasks.items():
        found = specs.get(name)
        same = found and (found.kind, found.num_outputs, found.class_names) == (
            task.kind,
            task.num_outputs,
            task.class_names,
        )
        if not same:
            seen = f"{found.kind}, classes {found.class_names}" if found else "absent"
            raise UserError(
                f"task {name!r} of {run_dir} ({task.kind}, classes {task.class_names}) does not "
                f"match the data ({seen}); evaluate on data with the same tasks and classes"
            )
    dataset = TaskImageDataset(
        loaded.splits[split],
        list(run.tasks.values()),
        run.transform,
        bad_images=recipe.data.bad_images,
    )
    loader = DataLoader(
        dataset,
        batch_size=recipe.train.eval_batch_size or recipe.train.batch_size,
        collate_fn=collate,
    )
    accelerator = Accelerator(cpu=True)
    return evaluate(run.model, loader, run.tasks, accelerator, prefix=split)
