"""Streamed sources: WebDataset tar shards (`data.source: webdataset`) and Hugging Face
streaming datasets (`data.streaming: true`).

A stream is a list of shards and a way to read one shard's rows in order; rows are dicts of
columns with the image under `data.image_column` (bytes or a `{bytes, path}` dict). Only the
training split streams: validation and test are read whole, once, into `datasets.Dataset`s
(they are meant to be small), so evaluation, metrics and predictions work as for any source.

WebDataset samples are grouped by key: `KEY.jpg` (or png, webp, ...) is the image, `KEY.json`'s
fields are columns, and any other member is a column named by its extension (`KEY.cls` ->
column `cls`, read as an integer; other text as a string).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from transferkit.core import IMAGE_EXTENSIONS
from transferkit.data.config import DataSection
from transferkit.data.sources import SPLIT_ALIASES, canonical_split, find_split
from transferkit.errors import UserError

_IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def _is_remote(url: str) -> bool:
    """A URL or a `pipe:` command (webdataset's gopen), not a local file."""
    return "://" in url or url.startswith("pipe:")


def is_streamed(data: DataSection) -> bool:
    """Whether the recipe's training split streams (shards or an HF streaming dataset)."""
    return data.source == "webdataset" or data.streaming


@dataclass(frozen=True)
class ShardStream:
    """The training split as shards: `read(shard)` yields that shard's rows in order."""

    shards: tuple[Any, ...]
    source: DataSection
    hub: Any = None  # the HF IterableDataset, for `data.streaming`

    def read(self, shard: Any) -> Iterator[dict]:
        if self.hub is not None:
            # `.iter`, not `iter()`: inside a data-loader worker `datasets` would split the
            # shard again among the workers, which already each read shards of their own.
            part = self.hub.shard(num_shards=len(self.shards), index=shard)
            for columns in part.iter(batch_size=256):
                yield from (dict(zip(columns, row)) for row in zip(*columns.values()))
        else:
            yield from _tar_rows(shard, self.source.image_column)

    def count(self, shard: Any) -> int | None:
        """The rows of a local tar shard, from its headers alone (None where that is not
        possible: a URL, a hub shard). Counted once."""
        if self.hub is not None or _is_remote(str(shard)):
            return None
        if shard not in _COUNTS:
            _COUNTS[shard] = _count_samples(shard)
        return _COUNTS[shard]

    def describe(self) -> str:
        return f"{len(self.shards)} shard(s) of {self.source.path}"


def open_stream(data: DataSection) -> tuple[ShardStream, dict[str, datasets.Dataset]]:
    """The training stream and the other splits the recipe asks for, read whole."""
    if data.max_samples is not None or data.unlabeled or data.balanced_sampler:
        key = next(k for k in ("max_samples", "unlabeled", "balanced_sampler") if getattr(data, k))
        raise UserError(
            f"data.{key}: not available with a streamed training split (data.source: "
            f"{data.source}{', data.streaming: true' if data.streaming else ''}), which is read "
            "once, in order, without its length; remove it"
        )
    if data.val_split is None:
        raise UserError(
            "data.val_split: a streamed training split cannot be carved for validation; name "
            "a validation split (a split name or, for shards, a pattern such as "
            "'validation-{0000..0003}.tar')"
        )
    if data.source == "webdataset":
        return _open_tar_shards(data)
    if data.source != "hub":
        raise UserError(
            f"data.streaming: true reads a Hugging Face dataset (data.source: hub, a hub name or "
            f"a folder of data files), not data.source: {data.source}; set data.source: hub"
        )
    return _open_hub_stream(data)


# ----------------------------------------------------------------------------- tar shards
def _open_tar_shards(data: DataSection) -> tuple[ShardStream, dict[str, datasets.Dataset]]:
    wanted = {"train": data.train_split, "validation": data.val_split, "test": data.test_split}
    shards = {role: _shard_urls(data.path, spec, role) for role, spec in wanted.items() if spec}
    others = {}
    for role in ("validation", "test"):
        if role in shards:
            rows = [row for url in shards[role] for row in _tar_rows(url, data.image_column)]
            others[role] = _table(rows, data.image_column, f"data.{_key(role)}")
    return ShardStream(tuple(shards["train"]), data), others


def _shard_urls(path: str, spec: str, role: str) -> list[str]:
    """The shards of one split: `spec` is a pattern (`train-{0000..0099}.tar`, `*.tar`, a URL)
    under `path`, or a split name, whose shards are `path/NAME-*.tar` (or `NAME_`, `NAME.`)."""
    from braceexpand import braceexpand

    key = f"data.{_key(role)}"
    if ".tar" in spec:
        full = spec if _is_remote(spec) or spec.startswith("/") else f"{path}/{spec}"
        urls = []
        for url in braceexpand(full):
            urls.extend(sorted(glob.glob(url)) if "*" in url or "?" in url else [url])
        local = [u for u in urls if not _is_remote(u)]
        missing = [u for u in local if not os.path.exists(u)]
        if missing or not urls:
            raise UserError(f"{key}: {missing[0] if missing else full}: no such shard")
        return urls
    if _is_remote(path):
        raise UserError(
            f"{key}: {spec!r} names a split, but {path} cannot be listed; give the split's "
            f"shards as a pattern, e.g. {key}: '{spec}-{{000000..000099}}.tar'"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"data.path: {path} is not a folder of .tar shards (data.source: webdataset)"
        )
    canonical = canonical_split(spec)  # "val" also finds validation-*.tar, and so on
    prefixes = (spec, *SPLIT_ALIASES[canonical]) if canonical else (spec,)
    found = sorted(str(p) for p in folder.glob("*.tar")
                   if any(p.name.startswith(f"{n}{s}") for n in prefixes for s in "-_."))  # fmt: skip
    if not found:
        names = sorted(p.name for p in folder.glob("*.tar"))[:5]
        raise UserError(
            f"{key}: no shards named {spec}-*.tar in {folder} (found: {', '.join(names) or 'none'}); "
            f"name them so, or give {key} as a pattern such as '{spec}-{{0000..0009}}.tar'"
        )
    return found


def _tar_rows(url: str, image_column: str) -> Iterator[dict]:
    """The samples of one tar shard as rows of columns (see the module docstring)."""
    from webdataset.tariterators import tarfile_samples

    try:
        for sample in tarfile_samples([{"url": url}]):
            yield _row(sample, image_column)
    except UserError:
        raise
    except Exception as err:  # a missing, truncated or unreadable shard
        raise UserError(f"cannot read shard {url}: {type(err).__name__}: {err}") from err


_COUNTS: dict[str, int] = {}  # rows of each local shard counted so far, in this process


def _count_samples(path: str) -> int:
    """Samples of a tar file as webdataset makes them (its member filters, then its grouping
    by key), from the headers alone: a seekable file is not read through."""
    import re
    import tarfile

    from webdataset import tariterators as wds

    def members(tar):
        for info in tar:  # webdataset's tar_file_iterator skips these members
            name = info.name
            meta = (
                "/" not in name
                and name.startswith(wds.meta_prefix)
                and name.endswith(wds.meta_suffix)
            )
            if info.isreg() and not meta and not re.match(r"__[^/]*__($|/)", name):
                yield {"fname": name, "data": b"", "__url__": path}

    try:
        with tarfile.open(path, "r:") as tar:
            return sum(1 for _ in wds.group_by_keys(members(tar)))
    except (OSError, tarfile.TarError) as err:
        raise UserError(f"cannot read shard {path}: {type(err).__name__}: {err}") from err


def _row(sample: dict, image_column: str) -> dict:
    row: dict[str, Any] = {"__key__": sample["__key__"]}
    image = None
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if name == "json":
            row.update(json.loads(value))
        elif name.lower() in _IMAGE_SUFFIXES and image is None:
            image = {"bytes": value, "path": f"{sample['__key__']}.{name}"}
        elif name == "cls":
            row["cls"] = int(value.decode().strip())
        else:
            row[name] = value.decode() if isinstance(value, bytes) else value
    row[image_column] = image  # None: reported as an unreadable image, like a missing file
    return row


def _table(rows: list[dict], image_column: str, key: str, features=None) -> datasets.Dataset:
    if not rows:
        raise UserError(f"{key}: its shards hold no samples")
    if features is not None:  # a hub split keeps its own types (class labels, sequences)
        return datasets.Dataset.from_list(rows, features=features)
    columns = sorted({c for row in rows for c in row} - {"__key__", image_column})
    table = {c: [row.get(c) for row in rows] for c in columns}
    table[image_column] = [row[image_column] for row in rows]
    try:
        dataset = datasets.Dataset.from_dict(table)
    except Exception as err:  # pyarrow rejects columns that mix types
        raise UserError(f"{key}: the shards' labels do not form a table: {err}") from err
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def _key(role: str) -> str:
    return {"train": "train_split", "validation": "val_split", "test": "test_split"}[role]


# ---------------------------------------------------------------------------- hub streaming
def _open_hub_stream(data: DataSection) -> tuple[ShardStream, dict[str, datasets.Dataset]]:
    """`datasets.load_dataset(data.path, streaming=True)`: a hub name or a folder of data files
    (parquet, csv, json, images), whose files are its shards."""
    try:
        loaded = datasets.load_dataset(data.path, streaming=True)
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"data.path: cannot stream {data.path!r} ({detail})") from err
    splits = dict(loaded) if isinstance(loaded, datasets.IterableDatasetDict) else {"train": loaded}
    picked = {}
    wanted = [
        ("train", data.train_split),
        ("validation", data.val_split),
        ("test", data.test_split),
    ]
    for role, name in wanted:
        if name is None:
            continue
        found = find_split(splits, name)
        if found is None:
            raise UserError(f"data.{_key(role)}: no split {name!r} in {data.path}; available "
                            f"splits: {', '.join(splits)}")  # fmt: skip
        split = splits[found]
        if data.image_column not in (split.features or {}):
            raise UserError(f"data.image_column: no column {data.image_column!r} in split "
                            f"{found!r} of {data.path}")  # fmt: skip
        if isinstance(split.features[data.image_column], datasets.Image):
            split = split.cast_column(data.image_column, datasets.Image(decode=False))
        picked[role] = split
    others = {
        role: _table(list(split), data.image_column, f"data.{_key(role)}", split.features)
        for role, split in picked.items()
        if role != "train"
    }
    train = picked["train"]
    return ShardStream(tuple(range(train.n_shards)), data, hub=train), others
