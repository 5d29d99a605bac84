"""`load_data`: from the recipe's data and tasks sections to encoded, checked splits.

Steps: read the source; pick the train / validation / test splits; infer each task's spec from
its label columns (over all splits, before any capping, so a `max_samples` trial run gets the
same heads as the full run); encode one label column per task; carve a validation split if
there is none; cap with `max_samples`; drop (or refuse) images that do not decode.
Row selection only ever builds index mappings, so image data is never copied.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import datasets
import numpy as np

from transferkit.core import TaskSpec
from transferkit.data.config import DataSection, TaskSection
from transferkit.data.images import find_bad_images
from transferkit.data.labels import column_values, encode_task, infer_task, known_classes
from transferkit.data.sources import find_split, prepare_images, read_source, read_unlabeled
from transferkit.data.stream_dataset import RowEncoder
from transferkit.data.streams import ShardStream, is_streamed, open_stream
from transferkit.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)
IMAGE = "image"  # the image column's name in the loaded splits, whatever the source called it


@dataclass
class LoadedData:
    """Encoded splits ("train", "validation", optionally "test"), task specs, skipped images.

    Each split has the column "image" (a `datasets.Image`) and one encoded column per task,
    named after the task (encodings: see `transferkit.data.labels`).
    """

    splits: dict[str, datasets.Dataset]
    tasks: list[TaskSpec]
    skipped_images: list[str] = field(default_factory=list)
    # Per split, the rows dropped as unreadable: another process passes them back to
    # `load_data(bad_rows=...)` instead of decoding every image again.
    bad_rows: dict[str, list[int]] = field(default_factory=dict)
    # A streamed training split (data/streams.py): then `splits` has no "train", and the
    # stream's rows are encoded batch by batch with `encoder`.
    stream: ShardStream | None = None
    encoder: RowEncoder | None = None


def load_data(
    data: DataSection,
    tasks: dict[str, TaskSection],
    seed: int,
    carve_validation: bool = True,
    bad_rows: dict[str, list[int]] | None = None,
) -> LoadedData:
    """Load, encode and check the recipe's data (see the module docstring).

    `carve_validation=False` keeps a source without a validation split whole (as "train"):
    evaluating on other data must not carve or cap it. `bad_rows` (a `LoadedData.bad_rows` from
    another process over the same data) skips decoding every image to find unreadable ones.
    """
    if not tasks:
        raise UserError("tasks: the recipe declares no task; add at least one under tasks")
    if IMAGE in tasks:
        raise UserError(
            "tasks.image: the task name 'image' is reserved for the image column; rename the task"
        )

    stream = None
    if is_streamed(data):
        stream, splits = open_stream(data)
        splits = prepare_images(splits, data, bases=[])
    else:
        splits = _pick_splits(read_source(data), data)
    columns = {
        name: _task_columns(name, cfg, splits, data, len(tasks)) for name, cfg in tasks.items()
    }

    specs, index_names = [], {}
    for name, cfg in tasks.items():
        cols = columns[name]
        first = next(iter(splits.values()))
        known = known_classes(first, cols[0]) if len(cols) == 1 else None
        if stream is not None:
            _check_streamed_task(name, cfg, data, known)
            if cols[0] == "cls" and data.source == "webdataset" and cfg.classes:
                known = [str(c) for c in cfg.classes]  # KEY.cls holds an index into them
                splits = {k: _names_for_indices(s, "cls", known) for k, s in splits.items()}
            if known and len(cols) == 1:
                index_names[cols[0]] = known
        values = [[v for s in splits.values() for v in column_values(s, c)] for c in cols]
        specs.append(infer_task(name, cfg, cols, values, known))
    splits = {k: _encode(s, data.image_column, specs, columns, tasks) for k, s in splits.items()}

    if "validation" not in splits and carve_validation and stream is None:
        strata = _strata(splits["train"], specs) if data.val_stratify else None
        splits["train"], splits["validation"] = _carve(splits["train"], data.val_fraction, seed,
                                                       strata)  # fmt: skip
    if data.max_samples is not None:
        splits = {k: _cap(s, data.max_samples, seed) for k, s in splits.items()}
    if data.unlabeled:  # after carving: unlabelled images train only, never validate
        splits["train"] = _with_unlabeled(splits["train"], data)

    skipped: list[str] = []
    dropped: dict[str, list[int]] = {}
    for name in list(splits):
        known = None if bad_rows is None else bad_rows.get(name, [])
        splits[name], bad, dropped[name] = _drop_bad_images(
            splits[name], name, data.bad_images, known
        )
        skipped.extend(bad)
        if len(splits[name]) == 0:
            why = f" after skipping {len(bad)} unreadable image(s)" if bad else ""
            raise UserError(
                f"split {name!r} of {data.path} is empty{why}; "
                "check data.path and the data.*_split settings"
            )
    ordered = {k: splits[k] for k in ("train", "validation", "test") if k in splits}
    # A stream is not read ahead: a regression target is standardized by the validation split.
    statistics = ordered["train" if stream is None else "validation"]
    specs = [_standardized(spec, statistics, tasks[spec.name]) for spec in specs]
    encoder = None
    if stream is not None:
        zero_one = {n: isinstance(tasks[n].column, (list, tuple)) for n in tasks}
        encoder = RowEncoder(tuple(specs), columns, zero_one, index_names)
    return LoadedData(splits=ordered, tasks=specs, skipped_images=skipped, bad_rows=dropped,
                      stream=stream, encoder=encoder)  # fmt: skip


def _check_streamed_task(
    name: str, cfg: TaskSection, data: DataSection, known: list[str] | None
) -> None:
    """A streamed split is not read ahead, so its classes cannot be found in it: they come from
    the recipe, or from the dataset's class labels (`known`)."""
    if cfg.kind in ("multiclass", "multilabel") and not cfg.classes and not known:
        if cfg.kind == "multilabel" and isinstance(cfg.column, (list, tuple)):
            return  # one 0/1 column per label: the columns name the labels
        raise UserError(
            f"tasks.{name}.classes: the training split streams ({data.path}), so its classes "
            "cannot be found by reading it first; list them, e.g. classes: [cat, dog]"
        )
    if cfg.class_weights == "balanced":
        raise UserError(
            f"tasks.{name}.class_weights: balanced needs the training labels' counts, which a "
            "stream does not give ahead; give one weight per class instead"
        )


def _names_for_indices(split: datasets.Dataset, column: str, names: list[str]) -> datasets.Dataset:
    """`column`'s class indices as the names they stand for (a bad index is a missing label)."""
    values = [names[v] if isinstance(v, int) and 0 <= v < len(names) else None
              for v in split[column]]  # fmt: skip
    return split.remove_columns(column).add_column(column, values)


def _standardized(spec: TaskSpec, train: datasets.Dataset, cfg: TaskSection) -> TaskSpec:
    """A regression task with the training split's mean and sd of each target (`standardize`):
    a size in pixels (sd 8.6) otherwise gives a loss 100 times a classifier's, and the summed
    loss follows it alone. A target with no spread keeps sd 1."""
    if spec.kind != "regression" or not getattr(cfg, "standardize", True):
        return spec
    values = np.asarray(train[spec.name][:], dtype=np.float64).reshape(len(train), -1)
    labelled = ~np.isnan(values)
    mean, std = np.zeros(values.shape[1]), np.ones(values.shape[1])
    for j in range(values.shape[1]):
        column = values[labelled[:, j], j]
        if len(column):
            mean[j] = column.mean()
            spread = column.std()
            std[j] = spread if spread > 0 else 1.0
    return dataclasses.replace(
        spec, target_mean=tuple(map(float, mean)), target_std=tuple(map(float, std))
    )


def _drop_bad_images(
    split: datasets.Dataset, name: str, bad_images: str, known: list[int] | None = None
) -> tuple[datasets.Dataset, list[str], list[int]]:
    """The split without images that fail to decode, their ids and rows ("error": a UserError).

    `known`: rows already found unreadable by another process (nothing is decoded then)."""
    if known is not None:
        drop = set(known)
        keep = [i for i in range(len(split)) if i not in drop]
        kept = split.select(keep, keep_in_memory=True) if drop else split
        return kept, [], sorted(drop)
    bad = find_bad_images(split, IMAGE, name)
    if not bad:
        return split, [], []
    if bad_images == "error":
        _, first, reason = bad[0]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(
            f"cannot read image {first} ({reason}) in split {name!r}{more}; "
            "fix or remove it, or set data.bad_images: skip"
        )
    logger.warning(
        "skipping %d unreadable image(s) in split %r, e.g. %s", len(bad), name, bad[0][1]
    )
    dropped = {row for row, _, _ in bad}
    keep = [i for i in range(len(split)) if i not in dropped]
    return split.select(keep, keep_in_memory=True), [image for _, image, _ in bad], sorted(dropped)


def _pick_splits(
    raw: dict[str, datasets.Dataset], data: DataSection
) -> dict[str, datasets.Dataset]:
    """{"train", "validation" if present, "test" if asked for} from the source's splits."""
    available = ", ".join(raw)
    picked = {}
    wanted = [
        ("train", "train_split", data.train_split),
        ("validation", "val_split", data.val_split),
        ("test", "test_split", data.test_split),
    ]
    for role, key, name in wanted:
        if name is None:
            continue
        found = find_split(raw, name)
        if found is None and role == "validation":
            # No validation split in the source: one is carved from train (logged, not an error).
            logger.info(
                "no split %r in %s; carving data.val_fraction of train for validation",
                name,
                data.path,
            )
            continue
        if found is None:
            raise UserError(
                f"data.{key}: no split {name!r} in {data.path}; available splits: "
                f"{available}.{did_you_mean(name, raw)}"
            )
        if len(raw[found]) == 0:
            raise UserError(f"split {found!r} (data.{key}) of {data.path} has no rows")
        picked[role] = raw[found]
    return picked


def _task_columns(
    name: str,
    cfg: TaskSection,
    splits: dict[str, datasets.Dataset],
    data: DataSection,
    num_tasks: int,
) -> list[str]:
    """The source columns a task reads; a missing one is a UserError listing the columns."""
    column = cfg.column
    columns = [name] if column is None else [column] if isinstance(column, str) else list(column)
    if not columns:
        raise UserError(f"tasks.{name}.column: an empty list names no column")
    resolved = []
    for col in columns:
        for split_name, split in splits.items():
            present = split.column_names
            # An image folder's class label is the column "label"; it feeds the task that names
            # that column, or the only task, whatever that task calls its column.
            if (
                col not in present
                and "label" in present
                and data.source == "imagefolder"
                and (col == "label" or num_tasks == 1)
            ):
                col = "label"
            if col not in present:
                others = [c for c in present if c != data.image_column]
                raise UserError(
                    f"tasks.{name}.column: no column {col!r} in split {split_name!r} of "
                    f"{data.path}.{did_you_mean(col, others)} "
                    f"Available columns: {', '.join(others) or '(none)'}"
                )
        if col == data.image_column:
            raise UserError(f"tasks.{name}.column: {col!r} is the image column (data.image_column)")
        resolved.append(col)
    return resolved


def _encode(
    split: datasets.Dataset, image_column: str, specs: list[TaskSpec], columns: dict, cfgs: dict
) -> datasets.Dataset:
    """The split reduced to "image" plus one encoded column per task."""
    out = split.select_columns([image_column])
    if image_column != IMAGE:
        out = out.rename_column(image_column, IMAGE)
    encoded, features = {}, {}
    for spec in specs:
        cols = columns[spec.name]
        zero_one = isinstance(cfgs[spec.name].column, (list, tuple))
        values = [column_values(split, c) for c in cols]
        encoded[spec.name], features[spec.name] = encode_task(spec, cols, values, zero_one)
    labels = datasets.Dataset.from_dict(encoded, features=datasets.Features(features))
    # Side by side, not a copy: neither table has an index mapping at this point.
    return datasets.concatenate_datasets([out, labels], axis=1)


def _with_unlabeled(train: datasets.Dataset, data: DataSection) -> datasets.Dataset:
    """The training rows followed by `data.unlabeled`'s images, with every label missing."""
    images = read_unlabeled(data)
    if data.image_column != IMAGE:
        images = images.rename_column(data.image_column, IMAGE)
    images = images.cast_column(IMAGE, train.features[IMAGE])
    missing = {name: [None] * len(images) for name in train.column_names if name != IMAGE}
    labels = datasets.Dataset.from_dict(
        missing, features=datasets.Features({k: train.features[k] for k in missing})
    )
    rows = datasets.concatenate_datasets([images, labels], axis=1)
    return datasets.concatenate_datasets([train, rows.select_columns(train.column_names)])


def _strata(train: datasets.Dataset, specs: list[TaskSpec]) -> list | None:
    """The labels of the first multiclass or binary task (None: no such task), to carve by."""
    first = next((s for s in specs if s.kind in ("multiclass", "binary")), None)
    return None if first is None else train[first.name]


def _carve(
    train: datasets.Dataset, fraction: float, seed: int, strata: list | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off `fraction` of train as validation, the same rows for the same seed; with
    `strata` (a label per row, None for missing), `fraction` of each label's rows (`data.
    val_stratify`), at least one of every label with two rows or more."""
    if not 0.0 < float(fraction) < 1.0:
        raise UserError(f"data.val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    n = len(train)
    n_val = max(1, round(n * float(fraction)))
    if n - n_val < 1:
        raise UserError(
            f"the train split has {n} row(s), too few to carve a validation split; "
            "add data, lower data.val_fraction or set data.val_split"
        )
    order = np.random.default_rng(seed).permutation(n)
    picked: list[int] = []
    if strata is not None:
        by_label: dict[str, list[int]] = {}
        for row in order:  # each label's rows in the seeded order
            by_label.setdefault(str(strata[row]), []).append(int(row))
        picked = [r for rows in by_label.values()
                  for r in rows[: max(int(len(rows) >= 2), round(len(rows) * float(fraction)))]]  # fmt: skip
    if 0 < len(picked) < n:
        val_rows = np.sort(np.array(picked, dtype=np.int64))
        train_rows = np.setdiff1d(np.arange(n), val_rows)
    else:  # not stratified, or no class has two rows
        val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (
        train.select(train_rows, keep_in_memory=True),
        train.select(val_rows, keep_in_memory=True),
    )


def _cap(split: datasets.Dataset, max_samples: int, seed: int) -> datasets.Dataset:
    """The first `max_samples` rows after a seeded shuffle (kept in their original order)."""
    if max_samples < 1:
        raise UserError(f"data.max_samples must be at least 1, got {max_samples}")
    if len(split) <= max_samples:
        return split
    rows = np.sort(np.random.default_rng(seed).permutation(len(split))[:max_samples])
    return split.select(rows, keep_in_memory=True)
