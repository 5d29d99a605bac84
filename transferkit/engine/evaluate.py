"""Per-task metrics: `evaluate` over a loader (used by training), and `evaluate_run` for
`transferkit eval RUN_DIR`: a run's saved model on a split of its data, or on other data."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from transferkit.data import TaskImageDataset, collate, load_data
from transferkit.engine import metrics as task_metrics
from transferkit.engine.loop import model_outputs
from transferkit.errors import UserError
from transferkit.inference import load, resolve_device
from transferkit.models import TaskSpec
from transferkit.recipes import Recipe
from transferkit.run_dir import RunDir

_MANIFESTS = (".csv", ".json", ".jsonl", ".parquet")


@torch.no_grad()
def evaluate(
    model,
    loader,
    tasks: dict[str, TaskSpec],
    accelerator: Accelerator | None = None,
    prefix: str = "val",
    metric_names: dict[str, list[str] | None] | None = None,
) -> dict[str, float]:
    """Per-task metrics over a loader; every sample counted once across processes.

    `metric_names` picks metrics per task (a recipe's `tasks.NAME.metrics`); default: all.
    Without an accelerator, batches go to the model's device.
    """
    model.eval()
    device = next(model.parameters()).device
    metric_names = metric_names or {}
    collections = {
        name: task_metrics.task_metrics(task, metric_names.get(name))
        for name, task in tasks.items()
    }
    counts = dict.fromkeys(tasks, 0)  # labelled rows seen: proof that each is counted once
    for batch in loader:
        if accelerator is None:
            key = "features" if "features" in batch else "image"
            batch = {**batch, key: batch[key].to(device)}
        outputs = model_outputs(model, batch)
        outputs = {k: v for k, v in outputs.items() if k in tasks}
        targets, masks = batch["targets"], batch["mask"]
        if accelerator is not None:
            outputs, targets, masks = accelerator.gather_for_metrics((outputs, targets, masks))
        for name, task in tasks.items():
            task_metrics.update(
                collections[name], task, outputs[name].cpu(), targets[name].cpu(), masks[name].cpu()
            )
            counts[name] += int(masks[name].sum())
    values = {}
    for name, collection in collections.items():
        for metric, value in task_metrics.compute(collection).items():
            values[f"{prefix}/{name}/{metric}"] = value
        values[f"{prefix}/{name}/count"] = counts[name]
    return values


def eval_split(run_dir: RunDir, split: str = "validation", data: str | None = None):
    """The run's recipe and one split of its data, with the task specs found in that data.

    With `data` (a manifest, image folder or saved dataset with the same columns), every row of
    that data is evaluated: the run's `max_samples` and validation carving do not apply, and a
    source without the asked split is taken whole.
    """
    overrides: list[str] = []
    if data:
        path = Path(data)
        saved = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        source = "manifest" if path.suffix in _MANIFESTS else ("disk" if saved else "imagefolder")
        overrides = [f"data.path={data}", f"data.source={source}", "data.max_samples=null"]
    recipe: Recipe = run_dir.recipe(overrides)
    loaded = load_data(recipe.data, recipe.tasks, recipe.seed, carve_validation=not data)
    splits = loaded.splits
    if data and split not in splits and len(splits) == 1:
        split = next(iter(splits))  # a plain folder or file: all of it
    if split not in splits:
        raise UserError(f"--split {split}: the data has splits {', '.join(splits)}")
    return recipe, splits[split], {t.name: t for t in loaded.tasks}


def check_tasks(
    run_dir, tasks: dict[str, TaskSpec], specs: dict[str, TaskSpec], what: str = "the data"
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
    run_dir: str | Path | RunDir,
    split: str = "validation",
    data: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    tta: list[str] | None = None,
) -> dict[str, float]:
    """Per-task metrics of a run's model; `data` replaces the recipe's data (same columns).

    `device`: None picks the GPU when there is one. The model is calibrated when the run was
    (`transferkit calibrate`) and averages `tta` views (default: the recipe's `data.tta`).
    """
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run = load(folder)
    model = run.adjusted(tta)  # before loading data: a forbidden flip fails fast
    recipe, rows, specs = eval_split(folder, split, data)
    check_tasks(folder.path, run.tasks, specs)
    dataset = TaskImageDataset(
        rows, list(run.tasks.values()), run.transform, bad_images=recipe.data.bad_images
    )
    size = batch_size or recipe.train.eval_batch_size or recipe.train.batch_size or 64
    cfg, target = recipe.train, resolve_device(device)
    # Test-time views and temperatures need the images and the adjusted model; plain heads
    # can read features from the shared cache instead.
    plain = not model.views and not model.temperatures
    if plain and cfg.feature_cache != "forbid" and cfg.feature_cache_shared:
        from transferkit.engine import feature_store as fs

        store = fs.FeatureStore(fs.cache_root(cfg.feature_cache_dir), cfg.feature_cache_limit_gb)
        # The heads of a run whose backbone was never trained (a linear probe) read the
        # features its training stored; other runs store theirs for the next evaluation. A
        # read-only cache folder is no error here: the images are evaluated instead.
        if store.writable() is None:
            model = run.model.to(target)
            model.backbone.freeze("all")  # the key of a fully frozen backbone: eval runs one
            name = fs.backbone_id(run.info["backbone"], run.info.get("model_kwargs", {}))
            dataset, _ = fs.shared_cache(store, model.backbone.eval(), name, dataset, size, 0,
                                         target, cfg.feature_cache_max_gb)  # fmt: skip
    loader = DataLoader(dataset, batch_size=size, collate_fn=collate)
    return evaluate(model.to(target), loader, run.tasks, prefix=split)
