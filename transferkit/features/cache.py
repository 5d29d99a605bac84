"""Feature caching: when a phase trains only the heads on a frozen, deterministic backbone, run
the backbone once over the data and train the heads from the stored features.

A phase qualifies when no backbone parameter trains, normalization statistics are frozen, the
train transforms are deterministic (`data.augment: none`), the backbone has no active dropout or
drop-path, and there are no auxiliary heads (they need feature maps). `train.feature_cache`:
`auto` caches where a phase qualifies, `force` also demands it of every frozen phase (an error
says why one does not qualify), `forbid` never caches. Features are kept in memory, or, when
their estimated size exceeds `train.feature_cache_max_gb`, written to disk batch by batch as they
are computed (an Arrow file that `datasets` memory-maps), so RAM holds one batch of them at once.

That is the cache of one run (`train.feature_cache_shared: false`). By default the features go
to the cache shared by every run and command (`feature_store.py`), built from the same pieces.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.core import Progress
from transferkit.errors import UserError
from transferkit.models import Backbone


def _stochastic_layers(backbone: Backbone) -> list[str]:
    names = []
    for name, module in backbone.model.named_modules():
        kind = type(module).__name__
        rate = (
            getattr(module, "p", None) if "Dropout" in kind else getattr(module, "drop_prob", None)
        )
        if ("Dropout" in kind or "DropPath" in kind or "DropBlock" in kind) and rate:
            names.append(name)
    return names


def why_not_cacheable(backbone: Backbone, augment: str, has_aux_heads: bool) -> list[str]:
    """Reasons the current phase cannot train from cached features (empty: it can)."""
    reasons = []
    if any(p.requires_grad for p in backbone.parameters()):
        reasons.append("backbone parameters train in this phase")
    if backbone.freeze_spec.norm == "train":
        reasons.append("normalization statistics update (@norm=train)")
    if augment != "none":
        reasons.append(f"train augmentation is random (data.augment: {augment})")
    if has_aux_heads:
        reasons.append("auxiliary heads need feature maps")
    stochastic = _stochastic_layers(backbone)
    if stochastic:
        reasons.append(f"the backbone has active dropout/drop-path ({stochastic[0]}, ...)")
    return reasons


def cache_decision(
    mode: str, backbone: Backbone, augment: str, has_aux_heads: bool, phase: int
) -> tuple[bool, str]:
    """Whether this phase trains from cached features, and a line for the log that says why."""
    if mode == "forbid":
        return False, "features: computed every step (train.feature_cache: forbid)"
    reasons = why_not_cacheable(backbone, augment, has_aux_heads)
    if not reasons:
        return True, "features: cached once for this phase (frozen, deterministic backbone)"
    frozen = not any(p.requires_grad for p in backbone.parameters())
    if mode == "force" and frozen:
        raise UserError(
            f"train.feature_cache: force, but phase {phase} cannot use cached features: {'; '.join(reasons)}. "
            "Use feature_cache: auto to fall back to computing them."
        )
    return False, f"features: computed every step ({'; '.join(reasons)})"


class CachedFeatures(Dataset):
    """Samples `{"features", "targets", "mask", "index"}` from stored backbone features."""

    def __init__(
        self, features, targets: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> None:
        self.features, self.targets, self.masks = features, targets, masks

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        row = self.features[index]
        return {
            "features": row["features"] if isinstance(row, dict) else row,
            "targets": {t: v[index] for t, v in self.targets.items()},
            "mask": {t: v[index] for t, v in self.masks.items()},
            "index": index,
        }


class _MemoryStore:
    """Features in one preallocated `[N, D]` tensor (no second copy from concatenating)."""

    def __init__(self, count: int, width: int) -> None:
        self.features = torch.empty(count, width)
        self.filled = 0

    def append(self, chunk: torch.Tensor, rows: torch.Tensor) -> None:
        self.features[self.filled : self.filled + len(chunk)] = chunk
        self.filled += len(chunk)

    def finish(self) -> torch.Tensor:
        return self.features[: self.filled]


class ArrowStore:
    """Features streamed to `disk_dir/features.arrow`, one record batch per chunk, with the
    dataset row each came from (column "rows": the shared cache keeps them with the features).

    The file is written under a name of this process's own and renamed when complete: another
    process building the same cache, or a dataset of an earlier phase still mapping the old
    file, never sees a partial one.
    """

    FILE = "features.arrow"

    def __init__(self, disk_dir: Path, width: int) -> None:
        disk_dir.mkdir(parents=True, exist_ok=True)
        self.path = disk_dir / self.FILE
        self.partial = disk_dir / f".{self.FILE}.{os.getpid()}.partial"
        self.width = width
        self.schema = pa.schema(
            [pa.field("features", pa.list_(pa.float32(), width)), pa.field("rows", pa.int64())]
        )
        self.writer = pa.ipc.new_stream(str(self.partial), self.schema)  # what `datasets` reads

    def append(self, chunk: torch.Tensor, rows: torch.Tensor) -> None:
        values = pa.array(chunk.numpy().reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, self.width)
        batch = pa.record_batch([column, pa.array(rows.numpy())], schema=self.schema)
        self.writer.write_batch(batch)

    def close(self) -> None:
        self.writer.close()
        os.replace(self.partial, self.path)

    def finish(self) -> datasets.Dataset:
        self.close()
        return datasets.Dataset.from_file(str(self.path)).with_format("torch")


def shard_name(rank: int, processes: int) -> str:
    return f"shard_{rank}_of_{processes}"


def shard_rows(count: int, rank: int, processes: int) -> range:
    """The rows process `rank` computes: every `processes`-th, starting at its rank."""
    return range(rank, count, processes)


def interleave(shards: list[torch.Tensor], count: int) -> torch.Tensor:
    """Rows of per-process shards (`shard_rows` order) back in dataset order; [count, ...]."""
    processes = len(shards)
    out = shards[0].new_empty((count, *shards[0].shape[1:]))
    for rank, shard in enumerate(shards):
        out[rank::processes] = shard[: len(shard_rows(count, rank, processes))]
    return out


@torch.no_grad()
def compute_features(backbone: Backbone, dataset, rows: range, store, batch_size: int,
                     num_workers: int, device: torch.device, show: bool = True) -> torch.Tensor:  # fmt: skip
    """Run the backbone over `rows` of `dataset` into `store`, one batch at a time (with a bar,
    or a line every half minute in a log, when `show`); returns the dataset row each stored
    feature came from."""
    from transferkit.data import collate

    subset = rows != range(len(dataset))
    loader = DataLoader(
        torch.utils.data.Subset(dataset, rows) if subset else dataset,
        batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
    )  # fmt: skip
    order = []
    progress = Progress(len(rows), "caching features", "img", enabled=show)
    for batch in loader:
        # Not bound to a name: the chunk is freed once stored, before the next one is computed.
        store.append(backbone(batch["image"].to(device)).float().cpu(), batch["index"])
        order.append(batch["index"])
        progress.update(len(batch["index"]))
    progress.close()
    # Position k holds sample k; its row differs only when an unreadable image was replaced by
    # the next readable one, whose targets then go with it, as on the image path.
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def build_cache(
    backbone: Backbone,
    dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    max_gb: float,
    disk_dir: Path,
    accelerator=None,
) -> CachedFeatures:
    """Run the (frozen) backbone once over `dataset`, a `TaskImageDataset`, in its current mode.

    Features stay in memory when their estimated size is at most `max_gb`; otherwise each
    batch's features go to `disk_dir` as soon as they are computed, and the cache reads them
    back from there (memory-mapped).

    With an `accelerator` of several processes, each process computes only its shard of the
    rows (`shard_rows`), and every process ends with the whole cache in dataset order, so the
    prepared loader over it shards and shuffles batches exactly as it does over images. In
    memory the shards are all-gathered; on disk each process writes its own shard file.
    """
    rank, processes = (
        (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    )
    count, width = len(dataset), backbone.num_features
    mine = shard_rows(count, rank, processes)
    on_disk = count * width * 4 / 1e9 > max_gb
    shard_dir = disk_dir / shard_name(rank, processes) if processes > 1 else disk_dir
    store = ArrowStore(shard_dir, width) if on_disk else _MemoryStore(len(mine), width)
    rows = compute_features(backbone, dataset, mine, store, batch_size, num_workers, device,
                            show=rank == 0)  # fmt: skip
    stored = store.finish()
    if processes > 1:
        stored, rows = _combine(stored, rows, count, disk_dir, accelerator)
    targets = {t: v[rows] for t, v in dataset.targets.items()}
    return CachedFeatures(stored, targets, {t: v[rows] for t, v in dataset.masks.items()})


def _combine(stored, rows: torch.Tensor, count: int, disk_dir: Path, accelerator):
    """Every process's shard, as one cache in dataset order (see `build_cache`)."""
    processes = accelerator.num_processes
    size = len(shard_rows(count, 0, processes))  # the largest shard: gather needs equal shapes
    padded_rows = torch.full((size,), -1, dtype=torch.long)
    padded_rows[: len(rows)] = rows
    gathered = accelerator.gather(padded_rows.to(accelerator.device)).cpu().view(processes, size)
    all_rows = interleave(list(gathered), count)
    if isinstance(stored, torch.Tensor):
        padded = stored.new_zeros((size, stored.shape[1]))
        padded[: len(stored)] = stored
        features = accelerator.gather(padded.to(accelerator.device)).cpu()
        return interleave(list(features.view(processes, size, -1)), count), all_rows
    accelerator.wait_for_everyone()  # every shard file is complete
    files = [disk_dir / shard_name(r, processes) / ArrowStore.FILE for r in range(processes)]
    shards = [datasets.Dataset.from_file(str(f)) for f in files]
    starts = [sum(len(s) for s in shards[:r]) for r in range(processes)]
    order = [starts[k % processes] + k // processes for k in range(count)]
    combined = datasets.concatenate_datasets(shards).select(order)
    return combined.with_format("torch"), all_rows
