"""The model layer: backbones behind one contract, freezing, and multi-task heads."""

from transferkit.models.backbone import Backbone, DataConfig, LayerGroup, LoadReport
from transferkit.models.factory import create_backbone
from transferkit.models.foreign import KeyMapping, convert_checkpoint, register_mapping
from transferkit.models.freezing import FreezeSpec
from transferkit.models.heads import AuxHeadSpec, TaskSpec
from transferkit.models.multitask import MultiTaskModel

__all__ = [
    "AuxHeadSpec",
    "Backbone",
    "DataConfig",
    "FreezeSpec",
    "KeyMapping",
    "LayerGroup",
    "LoadReport",
    "MultiTaskModel",
    "TaskSpec",
    "convert_checkpoint",
    "create_backbone",
    "register_mapping",
]
