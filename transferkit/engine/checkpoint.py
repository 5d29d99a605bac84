"""Atomic, safely loaded training checkpoints on top of Accelerate's `save_state`/`load_state`.

- Atomic: a checkpoint is written to `.tmp_NAME`, completed with `trainer_state.json`, and only
  then renamed to `NAME`; a kill during a save leaves the previous checkpoints untouched, and
  old ones are deleted only after the new one is complete. Accelerate's own folders are written
  in place (with `total_limit=1` a kill during the second save can leave none complete).
- Safe: Accelerate loads registered custom objects with `weights_only=False`, so a checkpoint
  received from someone else could run code. Every pickle-based file is first opened with
  a `weights_only=True` loader, which refuses code, before Accelerate touches it.
- Complete: a missing or unreadable file (random states included) is an error, never a
  silently inexact resume.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils.other import load as safe_load

from transferkit.engine.state import TrainerState
from transferkit.errors import UserError
from transferkit.rundir import CHECKPOINT_STATE, RunDir, checkpoint_name

# Accelerate's files, each with the names it may have: under FSDP the model and optimizer are
# a full state dict (`pytorch_model_fsdp.bin`, `optimizer.bin`) or sharded folders that
# torch.distributed.checkpoint reads (`pytorch_model_fsdp_0/`, `optimizer_0/`).
_REQUIRED = (
    ("model.safetensors", "pytorch_model_fsdp.bin", "pytorch_model_fsdp_0"),
    ("optimizer.bin", "optimizer_0"),
    ("scheduler.bin",),
    ("custom_checkpoint_0.pkl",),
)


def save_checkpoint(
    accelerator: Accelerator, run_dir: RunDir, state: TrainerState, keep: int
) -> Path:
    """Save everything needed to resume; keep the newest `keep` plus `state.best_checkpoint`."""
    folder = run_dir.checkpoints_dir
    name = checkpoint_name(state.step, state.epoch_done)
    final, tmp = folder / name, folder / f".tmp_{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(tmp)  # last: marks the checkpoint complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        protected = {state.best_checkpoint}
        older = [p for p in run_dir.checkpoints()[:-keep] if p.name not in protected]
        for old in older:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _verify(path: Path, num_processes: int) -> TrainerState:
    required = [
        *_REQUIRED,
        *((f"random_states_{i}.pkl",) for i in range(num_processes)),
        (CHECKPOINT_STATE,),
    ]
    missing = [
        " or ".join(names) for names in required if not any((path / n).exists() for n in names)
    ]
    if missing:
        raise UserError(
            f"checkpoint {path} is incomplete (missing {', '.join(missing)}); resuming from it "
            "would not be exact. Delete it to resume from the previous one."
        )
    for file in path.glob("*.pkl"):
        try:
            # Accelerate's loader, with weights_only=True: tensors, containers and the numpy
            # types of RNG states are allowed; any other global (code) is refused.
            safe_load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
            raise UserError(
                f"checkpoint file {file} cannot be loaded safely ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160]}); it may be corrupt or contain code, "
                "which transferkit never runs"
            ) from None
    return TrainerState.load(path)


def load_checkpoint(accelerator: Accelerator, run_dir: RunDir) -> tuple[Path, TrainerState]:
    """Load the newest complete checkpoint of a run; returns its path and trainer state."""
    checkpoints = run_dir.checkpoints()
    if not checkpoints:
        raise UserError(
            f"--resume {run_dir.path}: no complete checkpoint in {run_dir.checkpoints_dir}"
        )
    path = checkpoints[-1]
    state = _verify(path, accelerator.num_processes)
    try:
        accelerator.load_state(str(path))
    except UserError:  # a checkpointed object's own refusal says what to do
        raise
    except Exception as err:  # noqa: BLE001 - a mismatched recipe surfaces as a size mismatch
        raise UserError(
            f"cannot resume from {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}. "
            "Was the recipe (tasks, classes, backbone) changed since the run started?"
        ) from None
    return path, state
