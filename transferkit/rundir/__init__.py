"""The run folder as a type: `RunDir` is the only code that knows its files, `ModelInfo` is
`model.json`, and `render_card` writes the model card (`README.md`) from both."""

from transferkit.rundir.card import render_card
from transferkit.rundir.curves import render_curves
from transferkit.rundir.folder import (
    CHECKPOINT_STATE,
    EXPORTED,
    LOCAL_ONLY,
    TRAINING_ONLY,
    RunDir,
    checkpoint_name,
)
from transferkit.rundir.info import ModelInfo
from transferkit.rundir.saved_model import load_saved_model

__all__ = [
    "CHECKPOINT_STATE",
    "EXPORTED",
    "LOCAL_ONLY",
    "TRAINING_ONLY",
    "ModelInfo",
    "RunDir",
    "checkpoint_name",
    "load_saved_model",
    "render_card",
    "render_curves",
]
