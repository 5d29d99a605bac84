"""The model layer: backbones behind one contract, freezing, and multi-task heads."""

from transferkit.models.adapters import (
    ADAPTER_METHODS,
    AdapterSpec,
    adapter_state,
    attach_adapter,
    merge_adapters,
)
from transferkit.models.backbone import Backbone, DataConfig, LayerGroup, LoadReport
from transferkit.models.factory import SOURCES as BACKBONE_SOURCES
from transferkit.models.factory import create_backbone, normalize_weights, parse_backbone_name
from transferkit.models.foreign import KeyMapping, convert_checkpoint, register_mapping
from transferkit.models.freezing import NORM_STATS, FreezeSpec
from transferkit.models.heads import AuxHeadSpec, TaskSpec
from transferkit.models.multitask import MultiTaskModel
from transferkit.models.offline import AUTO_WEIGHTS, pretrained_offline, resolve_auto_weights
from transferkit.models.task_outputs import probabilities

__all__ = [
    "ADAPTER_METHODS",
    "BACKBONE_SOURCES",
    "NORM_STATS",
    "AdapterSpec",
    "adapter_state",
    "attach_adapter",
    "merge_adapters",
    "normalize_weights",
    "parse_backbone_name",
    "pretrained_offline",
    "resolve_auto_weights",
    "AUTO_WEIGHTS",
    "probabilities",
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
