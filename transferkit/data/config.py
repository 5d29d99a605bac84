"""The data layer's settings, as typed sections: the recipe schema embeds these classes, and
`load_data` takes them. Each choice (sources, augment presets, bad-image policy) is defined
here once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transferkit.core import TASK_KINDS, bounded

SOURCES = ("imagefolder", "manifest", "disk", "hub", "webdataset")
AUGMENTS = ("none", "light", "strong")  # presets; data.augment also takes timm's policy strings
AUGMENT_LIBRARIES = ("timm", "torchvision")  # torchvision: the presets of runs made before timm's
BAD_IMAGE_POLICIES = ("skip", "error")
TTA_VIEWS = ("hflip", "crops")  # test-time views: the mirror image; four corner crops + center

Source = Literal[SOURCES]  # type: ignore[valid-type]
AugmentLibrary = Literal[AUGMENT_LIBRARIES]  # type: ignore[valid-type]
BadImages = Literal[BAD_IMAGE_POLICIES]  # type: ignore[valid-type]
TaskKind = Literal[TASK_KINDS]  # type: ignore[valid-type]
TtaView = Literal[TTA_VIEWS]  # type: ignore[valid-type]


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
    # Classification only: targets move this far towards uniform (1/C; 1/2 for sigmoid tasks).
    label_smoothing: float = bounded(0.0, ge=0, lt=1)
    # One weight per class ([negative, positive] for binary, per label for multilabel), or
    # "balanced": computed from the training labels (engine.losses.balanced_class_weights).
    class_weights: list[float] | Literal["balanced"] | None = None
    # Binary and multilabel: focal loss with this gamma instead of binary cross-entropy.
    focal_gamma: float | None = bounded(None, gt=0)
    # Regression: learn the target standardized by the training split's mean and sd (the loss in
    # standard units beside the other tasks'; predictions and metrics stay in the column's
    # units). false: the raw values, as runs made before this key trained.
    standardize: bool = True
    # Classes found in the data (not declared in `classes`) must have at least this many
    # labelled examples; a class seen once is usually a typo, and it skews AUROC and F1.
    min_examples: int = bounded(2, ge=1)


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
    # Carve that fraction of each class of the first multiclass or binary task (missing labels
    # as one more class), so that every class is validated; `fit` plans set it.
    val_stratify: bool = False
    image_size: int | None = bounded(None, ge=8)
    # A preset (none, light, strong: names for timm settings, docs/training_features.md) or a
    # timm policy string: rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, original, v0,
    # 3a, or trivialaugment. Built by timm's create_transform.
    augment: str = "light"
    # Random erasing's probability (null: the preset's, 0.25 for strong, else 0) and the
    # random-resized-crop area range (null: [0.6, 1.0]).
    random_erasing: float | None = bounded(None, ge=0, le=1)
    scale: list[float] | None = None
    # Runs made before timm built the presets used hand-built torchvision ones; they keep them,
    # so that they resume exactly.
    augment_library: AugmentLibrary = "timm"
    bad_images: BadImages = "skip"
    num_workers: int | None = bounded(None, ge=0)
    trust_remote_code: bool = False
    max_samples: int | None = bounded(None, ge=1)
    # Whether images may be mirrored left-right (false for digits and text): the light and
    # strong augment presets flip only when true, and test-time flips need it.
    horizontal_flip: bool = True
    # Views that `transferkit eval` and `predict` average by default (`--tta` overrides).
    tta: list[TtaView] = field(default_factory=list)
    # Draw training rows with equal total weight per class of this task (multiclass or binary).
    balanced_sampler: str | None = None
    # Images without labels (a folder, or a manifest with data.image_column), added to the
    # training rows with every label missing: a distilled student learns them from its teacher.
    unlabeled: str | None = None
    # Stream the training split instead of loading it (data/streams.py): a hub dataset or a
    # folder of data files with `source: hub`; tar shards always stream (`source: webdataset`,
    # `path` a folder or URL prefix, the splits names or patterns such as 'train-{00..99}.tar').
    # An epoch is then train.steps_per_epoch steps; validation and test are read whole.
    streaming: bool = False
    # Rows each stream reader shuffles among (a buffer; more mixes better, costs memory).
    shuffle_buffer: int = bounded(1000, ge=1)
