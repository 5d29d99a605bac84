"""The ground floor: plain data and helpers every other layer uses, with no torch, so that an
exported ONNX model can be described, preprocessed and predicted where torch is not installed.

- `task_spec`: what a task is (`TaskSpec`, kinds, metric names, `task_of`);
- `preprocess`: a backbone's preprocessing (`DataConfig`) and eval preprocessing in NumPy;
- `image_files`: finding and decoding image files the same way everywhere;
- `fields`: numeric bounds on recipe fields; `seeding`: seeds derived from positions;
- `stable_bytes`: safetensors files whose bytes depend only on what they hold;
- `lazy`: package faces that import their modules on first use.
"""

from transferkit.core.fields import BOUNDS, bounded
from transferkit.core.image_files import IMAGE_EXTENSIONS, list_image_files, open_image
from transferkit.core.lazy import lazy_exports
from transferkit.core.preprocess import DataConfig, Preprocessing
from transferkit.core.progress import Progress
from transferkit.core.seeding import derive_seed
from transferkit.core.stable_bytes import sort_safetensors_metadata
from transferkit.core.task_spec import (
    AUX_SEPARATOR,
    CLASSIFICATION_METRICS,
    LOWER_IS_BETTER,
    MEAN_SCORE,
    REGRESSION_METRICS,
    TASK_KINDS,
    AuxHeadSpec,
    TaskSpec,
    score_metric,
    task_of,
)

VERSION = "0.1.0"  # the package version, as pyproject.toml has it

__all__ = [
    "VERSION",
    "AUX_SEPARATOR",
    "BOUNDS",
    "CLASSIFICATION_METRICS",
    "IMAGE_EXTENSIONS",
    "LOWER_IS_BETTER",
    "MEAN_SCORE",
    "REGRESSION_METRICS",
    "TASK_KINDS",
    "AuxHeadSpec",
    "DataConfig",
    "Preprocessing",
    "Progress",
    "TaskSpec",
    "score_metric",
    "bounded",
    "derive_seed",
    "lazy_exports",
    "list_image_files",
    "open_image",
    "sort_safetensors_metadata",
    "task_of",
]
