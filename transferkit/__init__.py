"""transferkit: fine-tune timm and torchvision backbones with frozen layers and multi-task heads."""

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

__version__ = "0.1.0"
__all__ = [
    "AuxHeadSpec",
    "Backbone",
    "DataConfig",
    "FreezeSpec",
    "MultiTaskModel",
    "TaskSpec",
    "UserError",
    "create_backbone",
]


def __getattr__(name: str):
    # `transferkit.load(run_dir)` and `transferkit.train(recipe)` pull in Accelerate and
    # datasets; import them on first use so `import transferkit` stays light.
    if name in ("load", "train"):
        from transferkit import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
