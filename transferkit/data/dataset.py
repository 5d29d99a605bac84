"""A torch Dataset over one encoded split, and the collate function for its samples.

Targets per task kind: multiclass int64 `[]`, binary float32 `[]`, multilabel float32 `[L]`,
regression float32 `[]` (one column) or `[T]`. Where a label is missing the mask is False and the
target holds 0, a harmless placeholder: a loss computed over the whole batch and then masked
stays finite (no NaN, no -1 class index). Always apply the mask.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable, Sequence

import datasets
import numpy as np
import torch

from transferkit.core import TaskSpec, derive_seed
from transferkit.data.config import BadImages
from transferkit.data.images import image_id, open_image
from transferkit.errors import UserError

logger = logging.getLogger(__name__)


def task_targets(task: TaskSpec, values: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets with placeholders, mask) for one task's encoded column."""
    if task.kind == "multiclass":
        target = torch.tensor([-1 if v is None else v for v in values], dtype=torch.int64)
        mask = target >= 0
    else:
        width = task.num_outputs
        vector = task.kind == "multilabel" or width > 1
        nan = float("nan")
        if vector:
            rows = [
                [nan] * width if v is None else [nan if x is None else x for x in v] for v in values
            ]
        else:
            rows = [nan if v is None else v for v in values]
        target = torch.tensor(rows, dtype=torch.float32)
        if vector:
            target = target.reshape(len(values), width)  # keeps the shape when the split is empty
        finite = torch.isfinite(target)
        # A vector counts as labelled only when every component is (the mask is per task).
        mask = finite.all(dim=-1) if vector else finite
    target = target.clone()
    target[~mask] = 0
    return target, mask


class TaskImageDataset(torch.utils.data.Dataset):
    """One split as samples `{"image", "targets", "mask", "index"}` for a DataLoader.

    Images are decoded here (not by `datasets`) so that a file that still fails to decode never
    crashes an epoch: with bad_images "skip" the next readable row is returned instead (so
    "index" is the row actually used), with "error" a `UserError` names the file.
    """

    def __init__(
        self,
        split: datasets.Dataset,
        tasks: Sequence[TaskSpec],
        transform: Callable,
        image_column: str = "image",
        bad_images: BadImages = "skip",
        seed: int | None = None,
    ) -> None:
        missing = [
            c for c in [image_column, *(t.name for t in tasks)] if c not in split.column_names
        ]
        if missing:
            raise UserError(
                f"the split has no column(s) {', '.join(missing)} "
                f"(columns: {', '.join(split.column_names)}); "
                "build splits with transferkit.data.load_data"
            )
        images = split.select_columns([image_column])
        if isinstance(images.features[image_column], datasets.Image):
            images = images.cast_column(image_column, datasets.Image(decode=False))
        self.images = images
        self.image_column = image_column
        self.tasks = list(tasks)
        self.transform = transform
        self.bad_images = bad_images
        self.targets: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            self.targets[task.name], self.masks[task.name] = task_targets(task, split[task.name][:])
        self._warned: set[int] = set()
        # With a seed, each sample's augmentation depends on (seed, epoch, row) only: the same
        # in any worker process and after a resume. The trainer sets `epoch` before each epoch;
        # it lives in shared memory so that persistent loader workers see it change.
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        # Out of range is an IndexError (a sequence's end: `for sample in dataset` stops there);
        # only an unreadable row wraps round, to the next readable one.
        index = int(index)
        index += len(self) if index < 0 else 0
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a split of {len(self)} rows")
        epoch = self.epoch
        for offset in range(len(self)):
            row = (index + offset) % len(self)
            sample = self._sample(row, self.images[row][self.image_column], epoch)
            if sample is not None:
                return sample
        raise UserError("no readable image in this split (every image failed to decode)")

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """A batch of samples, its image column read from Arrow in one call (a DataLoader uses
        this when it exists; row by row, the reads cost a sixth of a small image's decode)."""
        rows = [int(i) for i in indices]
        sources = self.images[rows][self.image_column]
        epoch = self.epoch
        samples = [self._sample(row, source, epoch) for row, source in zip(rows, sources)]
        # An unreadable row is replaced as __getitem__ replaces it: by the next readable one.
        return [self[row] if s is None else s for row, s in zip(rows, samples)]

    def _sample(self, row: int, source, epoch: int) -> dict | None:
        """The sample of `row`, or None when its image cannot be read (bad_images: skip)."""
        try:
            image = open_image(source)
        except Exception as err:
            name = image_id(source, f"row {row}")
            if self.bad_images == "error":
                raise UserError(f"cannot read image {name}: {type(err).__name__}: {err}") from err
            if row not in self._warned:
                self._warned.add(row)
                logger.warning(
                    "skipping unreadable image %s (%s: %s)", name, type(err).__name__, err
                )
            return None
        seed = None if self.seed is None else derive_seed(self.seed, epoch, row)
        return {
            "image": transform_seeded(self.transform, image, seed),
            "targets": {t: self.targets[t][row] for t in self.targets},
            "mask": {t: self.masks[t][row] for t in self.masks},
            "index": row,
        }


def transform_seeded(transform: Callable, image, seed: int | None) -> torch.Tensor:
    """`transform(image)`, its random draws made from `seed` alone (None: unseeded)."""
    if seed is None or getattr(transform, "deterministic", False):
        return transform(image)  # nothing random to seed
    # The CPU generator only, which the transforms draw from: torch.manual_seed also queues a
    # seed for every accelerator backend, each with a saved traceback while CUDA is not
    # initialized (a third of a decode's time here).
    torch.default_generator.manual_seed(seed)
    with _python_and_numpy_seeded(seed):  # timm's policies draw from both
        return transform(image)


@contextlib.contextmanager
def _python_and_numpy_seeded(seed: int):
    """Python's and NumPy's global RNGs seeded for one sample, then put back as they were: the
    augmentation depends on the sample's position only, and whatever else draws from them in
    this process (mixup's NumPy draws, with workers off) sees the sequence it saw before."""
    python, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)


def collate(batch: list[dict]) -> dict:
    """Stack samples into a batch.

    image `[B, 3, H, W]` (or cached backbone `features` `[B, D]`), targets `{task: [B, ...]}`,
    mask `{task: bool [B]}`, index int64 `[B]`.
    """
    first = batch[0]
    inputs = "features" if "features" in first else "image"
    return {
        inputs: torch.stack([s[inputs] for s in batch]),
        "targets": {t: torch.stack([s["targets"][t] for s in batch]) for t in first["targets"]},
        "mask": {t: torch.stack([s["mask"][t] for s in batch]) for t in first["mask"]},
        "index": torch.tensor([s["index"] for s in batch], dtype=torch.long),
    }


def num_workers(requested: int | None) -> int:
    """data.num_workers, or by default one worker per spare core (at most 8)."""
    return requested if requested is not None else min(8, max(0, (os.cpu_count() or 1) - 1))
