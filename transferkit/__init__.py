"""transferkit: fine-tune timm and torchvision backbones with frozen layers and multi-task heads.

The Python API (see `transferkit.api`): `fine_tune(recipe, data=...)` trains and returns a
`FineTuneResult`; `load(run_dir)` gives a run's model back for `predict`; `RunDir(path)` reads a
run folder (records, best and final metrics, checkpoints); `interpolate(run_dir, alphas)` is
WiSE-FT (`transferkit.wise_ft`); `rank(recipe, candidates)` scores backbones before training
(`transferkit.transferability`).
"""

from transferkit.errors import UserError
from transferkit.models import (
    AuxHeadSpec,
    Backbone,
    DataConfig,
    FreezeSpec,
    MultiTaskModel,
    TaskSpec,
    create_backbone,
)
from transferkit.run_dir import RunDir

__version__ = "0.1.0"
__all__ = [
    "AuxHeadSpec",
    "Backbone",
    "DataConfig",
    "FineTuneResult",
    "FreezeSpec",
    "MultiTaskModel",
    "Run",
    "RunDir",
    "TaskSpec",
    "UserError",
    "create_backbone",
    "evaluate_run",
    "fine_tune",
    "interpolate",
    "load",
    "load_recipe",
    "rank",
    "train",
]

# Names that pull in Accelerate, datasets or torchjd are imported on first use, so
# `import transferkit` stays light.
_LAZY = {
    "fine_tune": "transferkit.api",
    "FineTuneResult": "transferkit.api",
    "load": "transferkit.inference",
    "Run": "transferkit.inference",
    "train": "transferkit.engine",
    "evaluate_run": "transferkit.engine.evaluate",
    "load_recipe": "transferkit.recipes",
    # Modules named apart from their functions: importing `transferkit.interpolate` would
    # otherwise replace the function `transferkit.interpolate` with the module.
    "interpolate": "transferkit.wise_ft",
    "rank": "transferkit.transferability",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
