"""Data: recipe sources -> encoded `datasets` splits, transforms, and a torch Dataset per split.

loaded = load_data(recipe.data, recipe.tasks, recipe.seed)
transform = build_transforms(backbone.data_config, train=True, augment="light")
train = TaskImageDataset(loaded.splits["train"], loaded.tasks, transform)
loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate)
"""

from transferkit.data.config import (
    AUGMENTS,
    SOURCES,
    TTA_VIEWS,
    DataSection,
    TaskSection,
)
from transferkit.data.dataset import TaskImageDataset, collate, num_workers
from transferkit.data.images import decode_prediction_inputs
from transferkit.data.loading import LoadedData, load_data
from transferkit.data.stream_dataset import RowEncoder, StreamedTaskDataset, reader_batches
from transferkit.data.streams import ShardStream, is_streamed
from transferkit.data.transforms import build_transforms, check_augment, tta_views

__all__ = [
    "AUGMENTS",
    "SOURCES",
    "TTA_VIEWS",
    "DataSection",
    "TaskSection",
    "tta_views",
    "LoadedData",
    "RowEncoder",
    "ShardStream",
    "StreamedTaskDataset",
    "is_streamed",
    "reader_batches",
    "TaskImageDataset",
    "build_transforms",
    "check_augment",
    "collate",
    "decode_prediction_inputs",
    "load_data",
    "num_workers",
]
