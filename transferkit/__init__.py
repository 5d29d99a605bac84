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
