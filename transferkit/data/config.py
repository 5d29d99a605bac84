"""The data layer's settings, as typed sections: the recipe schema embeds these classes, and
`load_data` takes them. Each choice (sources, augment presets, bad-image policy) is defined
here once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transferkit.fields import bounded
from transferkit.models.heads import TASK_KINDS

SOURCES = ("imagefolder", "manifest", "disk", "hub")
AUGMENTS = ("none", "light", "strong")
BAD_IMAGE_POLICIES = ("skip", "error")

Source = Literal[SOURCES]  # type: ignore[valid-type]
Augment = Literal[AUGMENTS]  # type: ignore[valid-type]
BadImages = Literal[BAD_IMAGE_POLICIES]  # type: ignore[valid-type]
TaskKind = Literal[TASK_KINDS]  # type: ignore[valid-type]


@dataclass(kw_only=True)
class TaskSection:
    """One task of a recipe: what to predict, from which column(s), with which head."""

    kind: TaskKind
    column: str | list[str] | None = None  # default: the task's name
    classes: list[str] | None = None  # default: found in the data
    hidden: int | None = bounded(None, ge=1)
    dropout: float = bounded(0.0, ge=0, lt=1)
    weight: float = bounded(1.0, ge=0)
    metrics: list[str] | None = None


@dataclass(kw_only=True)
class DataSection:
    """Where the images and labels come from and how they are split and augmented."""

    source: Source
    path: str
    image_column: str = "image"
    train_split: str = "train"
    val_split: str | None = "validation"
    test_split: str | None = None
    val_fraction: float = bounded(0.2, gt=0, lt=1)
    image_size: int | None = bounded(None, ge=8)
    augment: Augment = "light"
    bad_images: BadImages = "skip"
    num_workers: int | None = bounded(None, ge=0)
    trust_remote_code: bool = False
    max_samples: int | None = bounded(None, ge=1)
