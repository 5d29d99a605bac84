"""A streamed training split as batches, read by several readers without reading a sample twice.

The readers are the data-loader workers of every process (one per process without workers):
reader `r` of process `p` is slot `p * readers + r` of `processes * readers` slots. The stream is
read in passes; pass `n` deals the shards, in an order drawn from `(seed, n)`, to the slots in
turn (slot `s` reads shards `s, s + slots, ...`), so every sample is read once per pass across
all processes. Each slot shuffles its rows through a buffer seeded by `(seed, pass, slot)` and
cuts them into batches; a slot's rows run on from one pass into the next, so its batches never
end, and the loader takes `train.steps_per_epoch` of them an epoch.

Everything a batch holds follows from (seed, slot, its number in the slot): the loader can start
a reader at any batch by reading past the rows before it (without decoding them), which is how a
run resumes exactly, and each image's augmentation is drawn from its position.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from transferkit.core import TaskSpec, derive_seed
from transferkit.data.dataset import task_targets, transform_seeded
from transferkit.data.images import image_id, open_image
from transferkit.data.labels import encode_task
from transferkit.data.streams import ShardStream
from transferkit.errors import UserError

logger = logging.getLogger(__name__)
_SHARD_ORDER, _BUFFER, _AUGMENT = 0x5A4D, 0xB0FF, 0xA06  # keep the seeded draws apart


@dataclass(frozen=True)
class RowEncoder:
    """Encodes streamed rows' label columns as `load_data` encodes a split's (data/labels.py)."""

    tasks: tuple[TaskSpec, ...]
    columns: dict[str, list[str]]  # task -> the source columns it reads
    zero_one: dict[str, bool]  # task -> its columns are 0/1 flags (a list of columns)
    index_names: dict[str, list[str]]  # column -> the class names its integer values index

    def __call__(self, rows: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{task: (targets, mask)} for a batch of rows; a missing column is a missing label."""
        out = {}
        for task in self.tasks:
            cols = self.columns[task.name]
            values = [[self._value(row.get(c), c) for row in rows] for c in cols]
            encoded, _ = encode_task(task, cols, values, self.zero_one[task.name])
            out[task.name] = task_targets(task, encoded)
        return out

    def _value(self, value, column: str):
        names = self.index_names.get(column)
        if names is None or not isinstance(value, int) or isinstance(value, bool):
            return value
        return names[value] if 0 <= value < len(names) else None


class StreamedTaskDataset(torch.utils.data.IterableDataset):
    """Batches `{"image", "targets", "mask", "index", "reader"}` of a `ShardStream`.

    `index` holds each row's position in its slot, `reader` (reader, batch number) lets the
    loader check that batches arrive in the order it expects. `start` maps a data-loader worker
    to the reader it plays and the batch it starts at; the loader sets it before it starts
    the workers.
    """

    def __init__(self, stream: ShardStream, encoder: RowEncoder, transform: Callable, *,
                 batch_size: int, seed: int, shuffle_buffer: int, bad_images: str,
                 process: int, processes: int, readers: int) -> None:  # fmt: skip
        self.stream, self.encoder, self.transform = stream, encoder, transform
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.bad_images = bad_images
        self.process, self.processes, self.readers = process, processes, readers
        self.start: dict[int, tuple[int, int]] = {0: (0, 0)}
        self.epoch = 0  # set by the trainer like a map-style split's; positions seed instead

    @property
    def slots(self) -> int:
        return self.processes * self.readers

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        reader, first = self.start[info.id if info is not None else 0]
        slot = self.process * self.readers + reader
        rows = self.rows(slot, skip=first * self.batch_size)
        for number in itertools.count(first):
            group = list(itertools.islice(rows, self.batch_size))
            yield self._batch(group, slot) | {"reader": (reader, number)}

    def rows(self, slot: int, skip: int = 0) -> Iterator[tuple[int, dict]]:
        """Slot `slot`'s rows with their positions, pass after pass, shuffled through its
        buffer, from position `skip` on: whole passes of shards whose rows can be counted
        without reading them (local tar files) are skipped unread; the rest are read past,
        without decoding."""
        from webdataset.filters import shuffle

        position = 0
        for number in itertools.count():
            order = np.random.default_rng(derive_seed(self.seed, _SHARD_ORDER, number))
            shards = [self.stream.shards[i] for i in order.permutation(len(self.stream.shards))]
            mine = shards[slot :: self.slots]
            counts = [self.stream.count(shard) for shard in mine] if skip > position else []
            if counts and None not in counts and position + sum(counts) <= skip:
                position += sum(counts)
                continue
            rows = iter(row for shard in mine for row in self.stream.read(shard))
            seed = derive_seed(self.seed, _BUFFER, number, slot)
            start = position
            for row in shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), seed=seed)(rows):
                if position >= skip:
                    yield position, row
                position += 1
            if position == start:
                raise UserError(
                    f"{self.stream.describe()}: reader {slot} of {self.slots} got no samples in a "
                    "pass (its shards are empty); check the shards"
                )

    def _batch(self, group: list[tuple[int, dict]], slot: int) -> dict:
        images, kept = [], []
        column = self.stream.source.image_column
        for position, row in group:
            try:
                image = open_image(row.get(column))
            except Exception as err:  # PIL raises many types
                name = image_id(row.get(column), str(row.get("__key__", position)))
                if self.bad_images == "error":
                    raise UserError(f"cannot read image {name}: {type(err).__name__}: {err}; fix "
                                    "or remove it, or set data.bad_images: skip") from err  # fmt: skip
                logger.warning(
                    "skipping unreadable image %s (%s: %s)", name, type(err).__name__, err
                )
                continue
            seed = derive_seed(self.seed, _AUGMENT, slot, position)
            images.append(transform_seeded(self.transform, image, seed))
            kept.append((position, row))
        if not kept:
            raise UserError(f"{self.stream.describe()}: no image of a batch of {len(group)} "
                            "decodes; check the shards' images")  # fmt: skip
        labels = self.encoder([row for _, row in kept])
        return {
            "image": torch.stack(images),
            "targets": {name: targets for name, (targets, _) in labels.items()},
            "mask": {name: mask for name, (_, mask) in labels.items()},
            "index": torch.tensor([position for position, _ in kept], dtype=torch.long),
        }


def reader_batches(batches: int, readers: int, reader: int) -> int:
    """How many of `batches` consecutive batches, dealt to `readers` in turn from reader 0,
    reader `reader` produces (what the data loader's in-order round robin does)."""
    return max(0, -(-(batches - reader) // readers))
