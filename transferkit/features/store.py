"""The shared feature cache: backbone features on disk, kept across runs and commands.

An entry holds the features of one split, as computed by one backbone, and is found by a key
made of everything that determines them (`_key_inputs`): the backbone's name and options, a
hash of its weights, what is frozen, the transform, the image size, a fingerprint of the images
and the device type. Any change to one of those is another key: a miss, never a stale hit.

Layout under the cache root (`train.feature_cache_dir`, else $TRANSFERKIT_CACHE, else
~/.cache/transferkit/features):

    KEY/shard_R_of_P/features.arrow   features and rows, streamed batch by batch (Arrow IPC)
    KEY/manifest.json                 what the key was made of; written last: the entry is complete
    KEY/last_used                     its modification time is when the entry was last read
    .locks/KEY.lock                   held while the entry is built

One process builds an entry under an exclusive lock (`filelock`: the OS releases it when the
process dies, so a killed build never blocks the next one); others wait on the lock, then read.
Files are written under partial names and the manifest is renamed into place last, so a killed
build leaves nothing that looks complete: the next builder clears the folder and starts again.
After each build the least recently used entries are removed until the cache fits its limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import torch
from filelock import FileLock, Timeout

from transferkit.errors import UserError
from transferkit.features.cache import (
    ArrowStore,
    CachedFeatures,
    compute_features,
    shard_name,
    shard_rows,
)

MANIFEST = "manifest.json"
LAST_USED = "last_used"
LOCKS = ".locks"
ENV_ROOT = "TRANSFERKIT_CACHE"
DEFAULT_ROOT = "~/.cache/transferkit/features"
FORMAT = 1  # bumped when the layout or the way features are computed changes


def cache_root(configured: str | None = None) -> Path:
    """`train.feature_cache_dir`, else $TRANSFERKIT_CACHE, else ~/.cache/transferkit/features."""
    return Path(configured or os.environ.get(ENV_ROOT) or DEFAULT_ROOT).expanduser()


# ---------------------------------------------------------------------------------------- key
def _weights_hash(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer: names, dtypes, shapes and bytes (one pass)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(images) -> str:
    """The images of a split, a `datasets.Dataset` with one undecoded `Image` column: the file
    list with sizes and modification times when the images are files, else the dataset's own
    fingerprint (`datasets` derives it from the content and every transform applied to it)."""
    column = images.column_names[0]
    stored = images.data.column(column)  # the table under any row selection
    embedded = sum(chunk.field("bytes").null_count != len(chunk) for chunk in stored.chunks)
    if embedded:
        return f"datasets:{images._fingerprint}"
    paths = images.with_format("arrow")[:][column].combine_chunks().field("path").to_pylist()
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        try:
            info = os.stat(path)
            digest.update(f"{path}|{info.st_size}|{info.st_mtime_ns}\n".encode())
        except (OSError, TypeError):
            digest.update(f"{path}|missing\n".encode())
    return f"files:{len(paths)}:{digest.hexdigest()}"


def backbone_id(name: str, kwargs: dict) -> str:
    """A backbone and its options, as the recipe's model section names them."""
    return f"{name} {json.dumps(kwargs, sort_keys=True, default=str)}"


def _key_inputs(backbone, backbone_id: str, transform, data: str, device: torch.device) -> dict:
    """Everything that determines a split's features; `backbone_id` names the backbone and its
    options (`timm:resnet18 {}`), `data` is a `data_fingerprint`."""
    summary = backbone.group_summary()
    return {
        "format": FORMAT,
        "backbone": backbone_id,
        "weights": _weights_hash(backbone),
        # The cache serves only phases where nothing in the backbone trains, so the frozen
        # prefix is every group; how normalization layers run is part of it.
        "frozen": [g["name"] for g in summary if not g["trainable"]],
        "norm": backbone.freeze_spec.norm,
        "transform": repr(transform),
        "image_size": list(backbone.data_config.input_size),
        "data": data,
        "device": device.type,
        "torch": torch.__version__.split("+")[0],
    }


def _make_key(inputs: dict) -> str:
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# -------------------------------------------------------------------------------------- store
@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict | None  # None: incomplete (being built, or a killed build's leftovers)
    size_bytes: int
    last_used: float


def _size(path: Path) -> int:
    total = 0
    for file in path.rglob("*"):
        with contextlib.suppress(OSError):  # removed meanwhile by another process
            total += file.stat().st_size if file.is_file() else 0
    return total


class FeatureStore:
    """The entries under one cache root, bounded by `limit_gb` (least recently used go first)."""

    def __init__(self, root: str | os.PathLike, limit_gb: float = 20.0) -> None:
        self.root = Path(root)
        self.limit_bytes = int(limit_gb * 1e9)

    def path(self, key: str) -> Path:
        return self.root / key

    def lock(self, key: str) -> FileLock:
        (self.root / LOCKS).mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / LOCKS / f"{key}.lock")

    def manifest(self, key: str) -> dict | None:
        """The complete entry's manifest, or None (absent, or not complete)."""
        try:
            return json.loads((self.path(key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def begin(self, key: str) -> Path:
        """An empty folder for a new build (hold the lock): a killed build's files go."""
        folder = self.path(key)
        shutil.rmtree(folder, ignore_errors=True)
        # exist_ok: a reader's touch during a removal can leave the folder behind.
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def commit(self, key: str, manifest: dict) -> None:
        """Mark the entry complete: the manifest is renamed into place last."""
        folder = self.path(key)
        manifest = {**manifest, "key": key, "created": time.time(), "size_bytes": _size(folder)}
        tmp = folder / f".{MANIFEST}.{os.getpid()}.partial"
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, folder / MANIFEST)
        self.touch(key)

    def touch(self, key: str) -> None:
        (self.path(key) / LAST_USED).touch()

    def entries(self) -> list[Entry]:
        """Every entry, complete or not, least recently used first."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in self.root.iterdir():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                used = folder / LAST_USED
                when = used.stat().st_mtime if used.exists() else folder.stat().st_mtime
            except OSError:
                continue  # removed meanwhile by another process
            found.append(
                Entry(folder.name, folder, self.manifest(folder.name), _size(folder), when)
            )
        return sorted(found, key=lambda e: e.last_used)

    def writable(self) -> OSError | None:
        """None when entries can be built here, else the error that says why not."""
        try:
            (self.root / LOCKS).mkdir(parents=True, exist_ok=True)
            probe = self.root / LOCKS / f".write_test.{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            return err
        return None

    def check_writable(self) -> None:
        """One clear error, naming the keys to change, when the cache folder cannot be used."""
        err = self.writable()
        if err is not None:
            raise UserError(
                f"cannot write the shared feature cache at {self.root}: {err.strerror}; set "
                f"train.feature_cache_dir (or ${ENV_ROOT}) to a writable folder, or "
                "train.feature_cache_shared: false"
            ) from None

    def remove(self, key: str, wait: float = 0) -> bool:
        """Remove an entry unless it is being built (then False). The manifest goes first, so a
        reader never takes a half-removed entry for a complete one."""
        try:
            with self.lock(key).acquire(timeout=wait):
                (self.path(key) / MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(self.path(key), ignore_errors=True)
        except Timeout:
            return False
        return True

    def evict(self, keep=()) -> list[str]:
        """Remove least recently used entries (never those in `keep`) until the cache fits its
        limit."""
        keep = {keep} if isinstance(keep, str) else set(keep)
        entries = self.entries()
        total = sum(e.size_bytes for e in entries)
        removed = []
        for entry in entries:
            if total <= self.limit_bytes:
                break
            if entry.key not in keep and self.remove(entry.key):
                total -= entry.size_bytes
                removed.append(entry.key)
        return removed


def _find_entry(store: FeatureStore, key: str) -> dict | None:
    """A complete entry's manifest (and mark it used), or None."""
    manifest = store.manifest(key)
    if manifest is not None:
        try:
            store.touch(key)
        except FileNotFoundError:  # removed since the manifest was read: a miss
            return None
    return manifest


# ------------------------------------------------------------------------- build or read one
class EntryGone(Exception):
    """An entry vanished or came up short while being read (evicted, cleared, truncated)."""


class _ShortEntry(OSError):
    """A shard file holds fewer rows than its entry's manifest says."""


def load_entry(folder: Path, manifest: dict, dataset, max_gb: float) -> CachedFeatures:
    """A complete entry as a cache over `dataset`'s targets, in dataset order: read into RAM
    when it fits `max_gb`, else memory-mapped (`datasets` over the Arrow files)."""
    count, width, processes = manifest["count"], manifest["width"], manifest["processes"]
    files = [folder / shard_name(r, processes) / ArrowStore.FILE for r in range(processes)]
    try:
        stored, rows = _read_entry(files, count, width, processes, max_gb)
    except (FileNotFoundError, _ShortEntry, ValueError, pa.ArrowInvalid) as err:
        raise EntryGone(str(err)) from None  # removed or incomplete: rebuilt by the caller
    except OSError as err:  # anything else (no memory to map it, too many open files, EIO)
        raise UserError(
            f"cannot read the feature cache entry {folder}: {err}; the entry is kept (it may be "
            "in use by other runs). Retry, or train with train.feature_cache_shared: false"
        ) from None
    targets = {t: v[rows] for t, v in dataset.targets.items()}
    return CachedFeatures(stored, targets, {t: v[rows] for t, v in dataset.masks.items()})


def _read_entry(files: list[Path], count: int, width: int, processes: int, max_gb: float):
    """The features and dataset rows of an entry's shard files, in dataset order."""
    if count * width * 4 / 1e9 <= max_gb:
        features, rows = torch.empty(count, width), torch.empty(count, dtype=torch.long)
        into, rows_into = features.numpy(), rows.numpy()
        for rank, file in enumerate(files):
            start = rank  # shard `rank` holds rows rank, rank + P, ... (`shard_rows`)
            with pa.memory_map(str(file)) as source:
                for batch in pa.ipc.open_stream(source):
                    stop = start + batch.num_rows * processes
                    values = batch.column(0).flatten().to_numpy()
                    into[start:stop:processes] = values.reshape(batch.num_rows, width)
                    rows_into[start:stop:processes] = batch.column(1).to_numpy()
                    start = stop
            # Every row must have been written: a shard cut short (a crash after the manifest
            # went in) would leave rows of uninitialized memory.
            if start - rank != len(shard_rows(count, rank, processes)) * processes:
                raise _ShortEntry(f"{file} holds fewer rows than its manifest says")
        return features, rows
    shards = [datasets.Dataset.from_file(str(f)) for f in files]
    if sum(len(s) for s in shards) != count:
        raise _ShortEntry(f"{files[0].parent.parent} holds fewer rows than its manifest says")
    starts = [sum(len(s) for s in shards[:r]) for r in range(processes)]
    order = [starts[k % processes] + k // processes for k in range(count)]
    stored = datasets.concatenate_datasets(shards).select(order).with_format("torch")
    # Indexing by column name gives a lazy `Column` in datasets 4+, not a tensor.
    return stored, stored.select_columns(["rows"])[:]["rows"]


def shared_cache(store: FeatureStore, backbone, backbone_id: str, dataset, batch_size: int,
                 num_workers: int, device: torch.device, max_gb: float,
                 accelerator=None, protect: set | None = None,
                 retries: int = 2) -> tuple[CachedFeatures, bool]:  # fmt: skip
    """The features of `dataset` (a `TaskImageDataset`) from the store, computed and stored
    first on a miss; and whether it was a hit. Under several processes the main one
    holds the lock and each computes its shard (`shard_rows`) into the entry.

    `protect` collects the keys one caller uses (a run's train and validation entries): the
    eviction after a build never removes them, so building the second cannot evict the first."""
    from accelerate.utils import broadcast_object_list

    rank, processes = (
        (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    )
    inputs = _key_inputs(backbone, backbone_id, dataset.transform,
                        data_fingerprint(dataset.images), device)  # fmt: skip
    key, count, width = _make_key(inputs), len(dataset), backbone.num_features
    lock, manifest = None, None
    if processes > 1:
        key = broadcast_object_list([key])[0]  # the main process's view of the inputs decides
    protect = set() if protect is None else protect
    protect.add(key)
    if rank == 0:
        store.check_writable()
        manifest = _usable(_find_entry(store, key), count, width)
        if manifest is None:
            lock = store.lock(key)
            lock.acquire()  # waits while another process builds this entry
            try:
                manifest = _usable(_find_entry(store, key), count, width)
                if manifest is None:
                    store.begin(key)
            except BaseException:
                lock.release()
                raise
            if manifest is not None:
                lock.release()
    if processes > 1:
        manifest = broadcast_object_list([manifest])[0]
    hit = manifest is not None
    if not hit:
        try:
            writer = ArrowStore(store.path(key) / shard_name(rank, processes), width)
            mine = shard_rows(count, rank, processes)
            compute_features(backbone, dataset, mine, writer, batch_size, num_workers, device,
                             show=rank == 0)  # fmt: skip
            writer.close()
            if processes > 1:
                accelerator.wait_for_everyone()  # every shard is complete
            if rank == 0:
                manifest = {"inputs": inputs, "count": count, "width": width,
                            "processes": processes}  # fmt: skip
                store.commit(key, manifest)
        finally:
            if lock is not None:
                lock.release()
        if rank == 0:
            store.evict(keep=protect)
        if processes > 1:
            manifest = broadcast_object_list([manifest])[0]
    try:
        return load_entry(store.path(key), manifest, dataset, max_gb), hit
    except EntryGone:
        if processes > 1 or not retries:
            raise
        # Evicted (another run's build, or `cache clear`) between finding or building it and
        # reading it, or cut short: readers hold no lock, so it is a miss, built again.
        store.remove(key)
        return shared_cache(store, backbone, backbone_id, dataset, batch_size, num_workers,
                            device, max_gb, protect=protect, retries=retries - 1)  # fmt: skip


def _usable(manifest: dict | None, count: int, width: int) -> dict | None:
    """The manifest, unless its shape disagrees with the data (then the entry is rebuilt)."""
    if manifest is None or (manifest.get("count"), manifest.get("width")) != (count, width):
        return None
    return manifest
