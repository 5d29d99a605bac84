"""The model layer: backbones behind one contract, freezing, and multi-task heads."""

from transferkit.models.backbone import Backbone, DataConfig, LayerGroup, LoadReport
from transferkit.models.factory import create_backbone
from transferkit.models.freezing import FreezeSpec
from transferkit.models.heads import AuxHeadSpec, TaskSpec
from transferkit.models.multitask import MultiTaskModel

__all__ = [
    "AuxHeadSpec",
    "Backbone",
    "DataConfig",
    "FreezeSpec",
    "LayerGroup",
    "LoadReport",
    "MultiTaskModel",
    "TaskSpec",
    "create_backbone",
]
