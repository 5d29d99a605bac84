"""A finished run's model on a split of its data, or on other data: `transferkit eval RUN_DIR`,
and the data loading that calibration, WiSE-FT, ensembles and export's parity check share."""

from __future__ import annotations

import re
from pathlib import Path

from torch.utils.data import DataLoader

from transferkit.data import TaskImageDataset, collate, load_data
from transferkit.engine import evaluate
from transferkit.errors import UserError
from transferkit.inference import load, resolve_device
from transferkit.models import TaskSpec
from transferkit.rundir import RunDir

_MANIFESTS = (".csv", ".json", ".jsonl", ".parquet")
# What `eval --set` may change: where the data is and how its columns are named. Anything
# else (the model, the training) was fixed when the run was trained.
_DATA_KEY = re.compile(r"(data\.[\w.]+|tasks\.[\w-]+\.column)=")


def _check_overrides(overrides: list[str]) -> None:
    for override in overrides:
        if not _DATA_KEY.match(override):
            raise UserError(
                f"--set {override}: only data keys apply to a trained run (data.*, "
                "tasks.NAME.column); the model and its training are the run's"
            )


def eval_split(
    run_dir: RunDir,
    split: str = "validation",
    data: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
):
    """The run's recipe and one split of its data, with the task specs found in that data.

    With `data` (a manifest, image folder or saved dataset with the same columns), every row of
    that data is evaluated: the run's `max_samples` and validation carving do not apply, and a
    source without the asked split is taken whole. `overrides`: `data.*` and
    `tasks.NAME.column` keys, for data whose columns are named otherwise.
    """
    _check_overrides(list(overrides))
    changes: list[str] = []
    if data:
        path = Path(data)
        saved = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        source = "manifest" if path.suffix in _MANIFESTS else ("disk" if saved else "imagefolder")
        changes = [f"data.path={data}", f"data.source={source}", "data.max_samples=null"]
    recipe = run_dir.recipe([*changes, *overrides])
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
        if not task.predicts_like(found):
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
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, float]:
    """Per-task metrics of a run's model; `data` replaces the recipe's data (same columns, or
    columns named by `overrides` such as `data.image_column=path`).

    `device`: None picks the GPU when there is one. The model is calibrated when the run was
    (`transferkit calibrate`) and averages `tta` views (default: the recipe's `data.tta`).
    """
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    _check_overrides(list(overrides))  # before the model loads: a wrong key fails fast
    run = load(folder)
    model = run.adjusted(tta)  # before loading data: a forbidden flip fails fast
    recipe, rows, specs = eval_split(folder, split, data, overrides)
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
        from transferkit.features import FeatureStore, backbone_id, cache_root, shared_cache

        store = FeatureStore(cache_root(cfg.feature_cache_dir), cfg.feature_cache_limit_gb)
        # The heads of a run whose backbone was never trained (a linear probe) read the
        # features its training stored; other runs store theirs for the next evaluation. A
        # read-only cache folder is no error here: the images are evaluated instead.
        if store.writable() is None:
            model = run.model.to(target)
            model.backbone.freeze("all")  # the key of a fully frozen backbone: eval runs one
            name = backbone_id(run.info.backbone, run.info.model_kwargs)
            dataset, _ = shared_cache(store, model.backbone.eval(), name, dataset, size, 0,
                                      target, cfg.feature_cache_max_gb)  # fmt: skip
    loader = DataLoader(dataset, batch_size=size, collate_fn=collate)
    return evaluate(model.to(target), loader, run.tasks, prefix=split)
