"""The run folder as a type: `RunDir` is the only code that knows the folder's file names.

A run folder holds:

    recipe.yaml            the resolved recipe, written first
    origin.json            where training ran: relative paths in the recipe are resolved there
    metrics.jsonl          one JSON record per finished epoch (`records()`, `history()`)
    checkpoints/step_N[_end]/   resumable training state (`checkpoints()`)
    model.safetensors + model.json   the best model so far (the final model once complete)
    README.md              the model card, written just before complete.json
    adapter/               with a peft adapter: its weights and config in peft's format
    complete.json          written last, once training has ended (`is_complete()`, `summary()`)
    skipped_images.txt, tensorboard/, feature_cache/, trackers.json, mlruns/, wandb/ (trackers)
    model.onnx, model.torchscript.pt(.json), model.pt2(.json)   `transferkit export` (optional)
    wise_ft.json + wise_ft.png   the WiSE-FT curve, once `transferkit interpolate` ran
    reliability.png        written by `transferkit calibrate` (temperatures go into model.json)
    curves.png             loss and validation metrics per epoch, drawn when training ends
    .lock                  held by the process training into the folder

`model.json` appears after the first epoch and is replaced when the monitored metric improves,
so it means "best so far"; only `complete.json` means "finished". Trainer, eval, predict,
sweep, ensemble and the notebooks all read a run through this class.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transferkit.core import sort_safetensors_metadata
from transferkit.errors import UserError
from transferkit.rundir.info import ModelInfo

RECIPE = "recipe.yaml"
ORIGIN = "origin.json"
METRICS = "metrics.jsonl"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"
COMPLETE = "complete.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "trainer_state.json"  # written last into a checkpoint: marks it complete
SKIPPED_IMAGES = "skipped_images.txt"
TENSORBOARD = "tensorboard"
TRACKERS = "trackers.json"  # the run's id in each experiment tracker, so a resume continues it
MLRUNS = "mlruns"  # MLflow's file store, when MLFLOW_TRACKING_URI names none
WANDB = "wandb"  # W&B's local files (all of them, offline)
FEATURE_CACHE = "feature_cache"
MODEL_CARD = "README.md"
# `transferkit export`'s default files, by format; the torch formats get a JSON beside them.
EXPORTED = {
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
    "exported-program": "model.pt2",
}
# Folders only training uses (resume state, cached features): left out when a run is published.
LOCK = ".lock"  # held (flock) by the process training into the folder
TRAINING_ONLY = (CHECKPOINTS, FEATURE_CACHE, MLRUNS, WANDB)
LOCAL_ONLY = (ORIGIN, LOCK)  # this machine's: left out when a run is published too
ADAPTER = "adapter"  # peft's file names inside it: adapter_model.safetensors, adapter_config.json
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
WISE_FT = "wise_ft"  # .json and .png: the WiSE-FT curve of `transferkit interpolate`
RELIABILITY = "reliability.png"  # `transferkit calibrate`: reliability diagram, before/after
CURVES = "curves.png"  # loss and validation metrics per epoch, drawn when a run ends


def checkpoint_name(step: int, epoch_end: bool) -> str:
    """Names sort in training order: step_00000012 < step_00000012_end < step_00000013."""
    return f"step_{step:08d}" + ("_end" if epoch_end else "")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# The locks this process holds. flock lets go only when every copy of the file is closed, and a
# forked data-loader worker that outlives a killed run for a few seconds would hold one, so the
# resume would be refused: each child closes its copies as it starts.
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


class RunDir:
    """One run folder; cheap to create, reads files only when asked."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ---- paths
    @property
    def recipe_path(self) -> Path:
        return self.path / RECIPE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def weights_path(self) -> Path:
        return self.path / MODEL_WEIGHTS

    @property
    def info_path(self) -> Path:
        return self.path / MODEL_INFO

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def mlflow_dir(self) -> Path:
        return self.path / MLRUNS

    @property
    def wandb_dir(self) -> Path:  # wandb.init(dir=...) puts its own "wandb/" inside
        return self.path

    def tracker_ids(self) -> dict[str, str]:
        """The run's id in each experiment tracker that gave one ({} before the first)."""
        path = self.path / TRACKERS
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_tracker_ids(self, ids: dict[str, str]) -> None:
        _write_atomic(self.path / TRACKERS, json.dumps(ids, indent=2))

    @property
    def feature_cache_dir(self) -> Path:
        return self.path / FEATURE_CACHE

    @property
    def skipped_images_path(self) -> Path:
        return self.path / SKIPPED_IMAGES

    @property
    def card_path(self) -> Path:
        return self.path / MODEL_CARD

    def exported_path(self, fmt: str) -> Path:
        """Where `transferkit export --format fmt` writes by default."""
        return self.path / EXPORTED[fmt]

    def write_card(self, text: str) -> None:
        _write_atomic(self.card_path, text)

    @property
    def wise_ft_json(self) -> Path:
        return self.path / f"{WISE_FT}.json"

    @property
    def wise_ft_plot(self) -> Path:
        return self.path / f"{WISE_FT}.png"

    @property
    def reliability_path(self) -> Path:
        return self.path / RELIABILITY

    @property
    def curves_path(self) -> Path:
        return self.path / CURVES

    # ---- who trains into it
    @contextlib.contextmanager
    def claimed(self) -> Iterator[RunDir]:
        """This process's exclusive claim on the folder while a run trains into it. The lock
        (`flock` on `.lock`) is released by the OS when the process ends, however it ends, so
        a killed run can be resumed at once; a second claim while it lives fails at once."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = (self.path / LOCK).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"run folder {self.path} is in use by a run that is still training ({holder}); "
                "wait for it to end, or train into another folder (--output)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        _HELD_LOCKS.add(handle.fileno())
        try:
            yield self
        finally:
            _HELD_LOCKS.discard(handle.fileno())
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def holds_run(self) -> bool:
        """Whether a run has trained (or begun to) in this folder."""
        return self.recipe_path.is_file() or self.metrics_path.is_file() or bool(self.checkpoints())

    def clear(self) -> None:
        """Remove everything in the folder but its lock (`train --overwrite`)."""
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # ---- state
    def has_model(self) -> bool:
        """A model was saved (the best so far, or the final one once complete)."""
        return self.weights_path.is_file() and self.info_path.is_file()

    def is_complete(self) -> bool:
        """Training ended (finished, stopped early or at max_steps): the marker written last."""
        return (self.path / COMPLETE).is_file()

    def summary(self) -> dict[str, Any]:
        """What the completion marker records: why training ended, the best epoch and metric."""
        if not self.is_complete():
            raise UserError(f"{self.path} is not a finished run (no {COMPLETE})")
        return json.loads((self.path / COMPLETE).read_text())

    def mark_complete(self, summary: dict[str, Any]) -> None:
        """Write the completion marker; call it after everything else is written."""
        _write_atomic(self.path / COMPLETE, json.dumps(summary, indent=2))

    def clear_complete(self) -> None:
        """A resumed run is unfinished again until it writes the marker anew."""
        (self.path / COMPLETE).unlink(missing_ok=True)

    # ---- recipe and model
    def recipe(self, overrides: list[str] | tuple[str, ...] = ()):
        """The run's resolved recipe (with optional `key=value` overrides), validated.

        A relative `data.path` or `model.weights` file that does not exist from here but does
        from the folder training ran in (`origin.json`) is made absolute, so eval, export and
        resume work from any directory."""
        return self.resolved_recipe(overrides).recipe

    def resolved_recipe(self, overrides: list[str] | tuple[str, ...] = ()):
        """`recipe()` with the recipe as recipe.yaml writes it (`transferkit.recipes.ResolvedRecipe`);
        keys a run saved by an older version lacks take the meaning they had then."""
        from transferkit.recipes import BEFORE_KEY_EXISTED, read_recipe_file, resolve_recipe

        if not self.recipe_path.is_file():
            raise UserError(f"{self.path} is not a run folder: it has no {RECIPE}")
        data = read_recipe_file(self.recipe_path)
        for (section, key), value in BEFORE_KEY_EXISTED.items():
            parent, _, each = section.partition(".")
            sections = data.get(parent)
            if not isinstance(sections, dict):
                continue
            for entry in sections.values() if each == "*" else [sections]:
                if isinstance(entry, dict):
                    entry.setdefault(key, value)
        return resolve_recipe(data, overrides, origin=self.origin(), where=str(self.recipe_path))

    def as_written(self, recipe):
        """`recipe` with `data.path` and `model.weights` as recipe.yaml has them where
        `recipe()` only resolved them from origin.json: a resumed run's recipe.yaml keeps the
        paths the user wrote, not this machine's absolute ones."""
        from transferkit.recipes import from_origin, read_recipe_file

        origin = self.origin()
        if origin is None or not self.recipe_path.is_file():
            return recipe
        saved = read_recipe_file(self.recipe_path)
        recipe = copy.deepcopy(recipe)
        for section, key in (("data", "path"), ("model", "weights")):
            written = (saved.get(section) or {}).get(key)
            now = getattr(getattr(recipe, section), key)
            if isinstance(written, str) and now and from_origin(written, origin) == now:
                setattr(getattr(recipe, section), key, written)
        return recipe

    def write_origin(self) -> None:
        """Record the working directory training runs in (relative recipe paths start there)."""
        _write_atomic(self.path / ORIGIN, json.dumps({"working_directory": os.getcwd()}))

    def origin(self) -> Path | None:
        """The working directory training ran in, if recorded."""
        path = self.path / ORIGIN
        if not path.is_file():
            return None
        return Path(json.loads(path.read_text())["working_directory"])

    def info(self) -> ModelInfo:
        """model.json: what is needed to rebuild the model and its preprocessing."""
        if not self.has_model():
            raise UserError(
                f"{self.path} has no model ({MODEL_INFO} and {MODEL_WEIGHTS}); "
                "is it a run folder whose first epoch finished?"
            )
        return ModelInfo.from_dict(json.loads(self.info_path.read_text()), str(self.info_path))

    def save_model(self, model, info: ModelInfo) -> None:
        """Write the model atomically (temporary names, then rename), weights before info."""
        from safetensors.torch import save_model as save_safetensors

        tmp_weights = self.path / (MODEL_WEIGHTS + ".tmp")
        metadata = {
            "format": "pt",
            "transferkit.backbone": info.backbone,
            "transferkit.data_config": json.dumps(info.data_config.to_dict()),
        }
        save_safetensors(model, str(tmp_weights), metadata=metadata)
        sort_safetensors_metadata(tmp_weights)  # identical models, identical bytes
        tmp_weights.replace(self.weights_path)
        self._write_info(info)

    def _write_info(self, info: ModelInfo) -> None:
        _write_atomic(self.info_path, json.dumps(info.to_dict(), indent=2))

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    def save_adapter(self, state: dict, config: dict) -> None:
        """The adapter alone, as peft's `save_pretrained` writes it (loadable with peft)."""
        from safetensors.torch import save_file

        self.adapter_dir.mkdir(exist_ok=True)
        tmp = self.adapter_dir / (ADAPTER_WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        sort_safetensors_metadata(tmp)
        tmp.replace(self.adapter_dir / ADAPTER_WEIGHTS)
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        _write_atomic(self.adapter_dir / ADAPTER_CONFIG, json.dumps(config, indent=2, default=str))

    def update_info(self, **changes: Any) -> ModelInfo:
        """Replace fields of model.json (calibration's temperatures), atomically. A model
        saved later (a better epoch) writes a new model.json, without them: they belong to
        the weights they were fitted on."""
        info = dataclasses.replace(self.info(), **changes)
        self._write_info(info)
        return info

    # ---- metrics
    def records(self) -> list[dict[str, Any]]:
        """The per-epoch records of metrics.jsonl, oldest first ([] before the first epoch)."""
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def history(self):
        """The records as a pandas DataFrame, one row per epoch; `lr` becomes `lr/<group>`."""
        import pandas as pd

        rows = []
        for record in self.records():
            row = {k: v for k, v in record.items() if k != "lr"}
            row.update({f"lr/{g}": v for g, v in (record.get("lr") or {}).items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def append_record(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_records(self, last_epoch: int) -> None:
        """Drop records after `last_epoch` (written after the checkpoint being resumed from)."""
        if self.metrics_path.is_file():
            kept = [r for r in self.records() if r["epoch"] <= last_epoch]
            _write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def final(self) -> dict[str, Any]:
        """The last epoch's record."""
        records = self.records()
        if not records:
            raise UserError(f"{self.path} has no finished epoch ({METRICS} is empty or missing)")
        return records[-1]

    def best(self) -> dict[str, Any]:
        """The record of the epoch whose model was kept (the best of the monitored metric)."""
        records = self.records()
        epoch = self.info().epoch if self.has_model() else None
        chosen = [r for r in records if r["epoch"] == epoch]
        if not chosen:
            raise UserError(f"{self.path} has no record of its saved model's epoch ({epoch})")
        return chosen[-1]

    def write_skipped_images(self, images: list[str]) -> None:
        self.skipped_images_path.write_text("\n".join(images) + "\n")

    # ---- checkpoints
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(
            p for p in self.checkpoints_dir.glob("step_*") if (p / CHECKPOINT_STATE).is_file()
        )
