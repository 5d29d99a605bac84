"""Experiment trackers (`train.trackers`), through Accelerate's: TensorBoard in the run folder
by default; MLflow, W&B and the others Accelerate speaks to when asked. Each gets the values
TensorBoard gets (per step and per epoch); MLflow and W&B also get the resolved recipe as the
run's config, flattened to `section.key` names.

A resumed run continues the same tracker run: the ids are kept in the run folder
(`trackers.json`) and handed back to MLflow (`run_id`) and W&B (`id`, `resume="allow"`).
MLflow writes to `MLFLOW_TRACKING_URI` when set, else to a file store in the run folder
(`mlruns/`); W&B keeps its files in the run folder and follows `WANDB_MODE` (offline too).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

from accelerate import Accelerator

from transferkit.errors import UserError
from transferkit.recipes import Recipe
from transferkit.rundir import RunDir

# The package each tracker imports, and the extra that installs it where transferkit has one.
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb",
             "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
             "swanlab": "swanlab", "trackio": "trackio"}  # fmt: skip
_EXTRAS = {"mlflow": "transferkit[mlflow]", "wandb": "transferkit[wandb]"}


def check_trackers(names: list[str]) -> None:
    """One clear error for a tracker whose package is not installed (Accelerate would skip it
    without a word)."""
    for name in names:
        package = _PACKAGES[name]
        found = importlib.util.find_spec(package) is not None
        if name == "tensorboard":  # torch's writer needs one of the two
            found = found or importlib.util.find_spec("tensorboardX") is not None
        if not found:
            install = _EXTRAS.get(name, package)
            raise UserError(
                f"train.trackers: {name} is not installed here; pip install '{install}', or "
                f"leave {name} out of train.trackers"
            )


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as `section.key: value`, values that every tracker stores (numbers, text)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # None, lists, empty mappings: as the recipe writes them
            flat[prefix] = json.dumps(value, default=str)

    walk("", dataclasses.asdict(recipe))
    return flat


def start_trackers(acc: Accelerator, recipe: Recipe, run_dir: RunDir, resumed: bool) -> None:
    """Start the recipe's trackers; on a resume, continue the runs they started before."""
    names = list(recipe.train.trackers)
    ids = run_dir.tracker_ids() if resumed else {}
    kwargs: dict[str, dict[str, Any]] = {}
    if "mlflow" in names:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store working only when asked to: the run folder's own
            # store is what it is for (a server or database: set MLFLOW_TRACKING_URI).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(run_dir.mlflow_dir.resolve().as_uri())
        kwargs["mlflow"] = {"run_name": run_dir.path.name, "run_id": ids.get("mlflow")}
    if "wandb" in names:
        kwargs["wandb"] = {"name": run_dir.path.name, "dir": str(run_dir.wandb_dir),
                           "config": _flat_config(recipe)}  # fmt: skip
        if "wandb" in ids:
            kwargs["wandb"] |= {"id": ids["wandb"], "resume": "allow"}
    try:
        acc.init_trackers(recipe.name or run_dir.path.name, init_kwargs=kwargs)
    except Exception as err:  # a server that is down, a login that is missing: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"train.trackers: a tracker could not start ({first}); fix it or "
                        f"leave it out of train.trackers ({', '.join(names)})") from None  # fmt: skip
    if not acc.is_main_process:
        return
    if "mlflow" in names and "mlflow" not in ids:
        # MLflow refuses a parameter logged twice with another value: the config goes in once,
        # when the tracker run starts (a resume may extend train.epochs).
        acc.get_tracker("mlflow").store_init_configuration(_flat_config(recipe))
    started = dict(ids)
    for name in ("mlflow", "wandb"):
        if name in names:
            tracker = acc.get_tracker(name, unwrap=True)
            started[name] = tracker.info.run_id if name == "mlflow" else tracker.id
    if started != ids:
        run_dir.save_tracker_ids(started)
