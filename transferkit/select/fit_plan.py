"""`transferkit fit DATA`, its plan: from a folder of class folders or a table, with no recipe,
to a recipe (`plan.yaml`) whose every choice is printed with its reason.

What the data says (docs/fit.md has the rules):
- a folder: one sub-folder per class is one multiclass task, `label`; `train/` and
  `validation/` (or `val/`) split folders are recognized;
- a table (CSV, TSV, JSON, JSON Lines, Parquet): the image column is the one named `--image-column`,
  else `image`, `path`, `file` or `filename`, else the one whose values are image files; a
  `split` column assigns rows; each other column is a task, typed by its values: two distinct
  values, binary; numbers with a fraction or more than 10 distinct values, regression; lists
  or `;`/`|`-separated labels, multilabel; up to 10 whole numbers or up to 50 texts (and at
  most one per two rows), multiclass; other text (an id, a caption) is refused, naming the
  column and the flags that settle it (`--task COLUMN=KIND`, `--ignore COLUMN`). Empty cells are
  missing labels.

What is chosen without measuring (the measured choices of backbone, method and rate are still
to come: #25): ImageNet EfficientNet-Lite0, which loads offline, trained with LP-FT (the
defaults that docs/quality.md measured level with a hand-written LP-FT loop), the image size
from the images' own size, and the epochs from the number of training images.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.core import (
    IMAGE_EXTENSIONS,
    MEAN_SCORE,
    TASK_KINDS,
    list_image_files,
    open_image,
)
from transferkit.errors import UserError

_IMAGE_NAMES = ("image", "path", "file", "filename", "image_path", "filepath")
_TABLES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet", ".pq")
_MAX_CLASSES = 50  # more distinct texts than this: an id or a caption, not a class
_MAX_NUMBER_CLASSES = 10  # more distinct whole numbers than this: a quantity (digits: 10)
_SEPARATORS = (";", "|")
BACKBONE = "timm:tf_efficientnet_lite0"  # ImageNet weights that load offline (a package ships them)


@dataclass
class Plan:
    """The recipe `fit` will train (`plan.yaml`) and the reasons, one line each."""

    recipe: dict
    reasons: list[str] = field(default_factory=list)

    def text(self) -> str:
        tasks = ", ".join(f"{n} ({t['kind']})" for n, t in self.recipe["tasks"].items())
        lines = [f"fit plan for {self.recipe['data']['path']}", f"  tasks: {tasks}"]
        return "\n".join(lines + [f"  - {reason}" for reason in self.reasons]) + "\n"


def make_plan(data: str | Path, *, tasks: dict[str, str] | None = None, ignore: tuple = (),
              image_column: str | None = None, name: str | None = None) -> Plan:  # fmt: skip
    """The plan for `data` (see the module docstring); `tasks` forces kinds by column."""
    path = Path(data).expanduser()
    forced = dict(tasks or {})
    for column, kind in forced.items():
        if kind not in TASK_KINDS:
            raise UserError(
                f"--task {column}={kind}: the kind must be one of {', '.join(TASK_KINDS)}"
            )
    path = path.resolve()  # plan.yaml then trains from any folder
    if not path.exists():
        raise UserError(f"fit {data}: no such file or folder")
    if path.is_dir() and _is_saved_dataset(path):
        recipe, reasons, images = _saved(path, forced, set(ignore), image_column)
    elif path.is_dir():
        recipe, reasons, images = _folder(path)
    elif path.is_file() and path.suffix.lower() in _TABLES:
        recipe, reasons, images = _table(path, forced, set(ignore), image_column)
    else:
        raise UserError(
            f"fit {data}: give a folder of class folders (FOLDER/CLASS/IMAGE.jpg), a table "
            f"({', '.join(_TABLES)}) with an image column, or a dataset saved with save_to_disk"
        )
    recipe["name"] = name or path.stem
    size, why = _image_size(images)
    epochs, probe = _epochs(recipe.pop("_train_rows"))
    recipe["model"] = {"backbone": BACKBONE, "weights": "auto"}
    recipe["data"]["image_size"] = size
    recipe["schedule"] = {"phases": [{"from_epoch": 0, "freeze": "all"},
                                     {"from_epoch": probe, "freeze": "none"}]}  # fmt: skip
    recipe["train"] = {"epochs": epochs}
    if len(recipe["tasks"]) > 1:
        # The kept model is the epoch with the best score over all tasks (what fit's trials are
        # scored on), not the first task's best: on 20-40 validation rows that one often peaks
        # in the probe phase, and the other tasks pay for it.
        recipe["train"]["monitor"] = f"val/{MEAN_SCORE}"
    reasons += [
        f"image size {size}: {why}",
        *(
            [
                "the kept model: the epoch with the best mean over the tasks of accuracy or R² "
                "(train.monitor: val/mean_score)"
            ]
            if len(recipe["tasks"]) > 1
            else []
        ),  # fmt: skip
        f"the defaults: {BACKBONE} with ImageNet weights (offline), LP-FT: {probe} epochs of a linear probe, "
        f"then {epochs - probe} of fine-tuning the whole backbone",
        "augmentation: light (a random crop and a horizontal flip); for text or digits, which "
        "must not be mirrored, add --set data.horizontal_flip=false",
    ]
    return Plan(recipe, reasons)


def _folder(root: Path) -> tuple[dict, list[str], list[Path]]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = {p.name.lower(): p for p in subdirs}
    split_names = [s for s in ("train", "validation", "val", "test") if s in splits]
    train = splits.get("train", root) if split_names else root
    classes = sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    counts = {c.name: len(list_image_files(c)) for c in classes}
    counts = {c: n for c, n in counts.items() if n}
    if not counts and any(root.glob("*.tar")):
        raise UserError(f"fit {root}: tar shards are streamed, which fit does not plan for; train "
                        "them with a recipe (data.source: webdataset, train.steps_per_epoch, "
                        "the classes listed: README, 'Data that does not fit on disk streams')")  # fmt: skip
    if not counts:
        raise UserError(f"fit {root}: no images in class sub-folders; put each class's images "
                        f"in its own folder ({root}/CLASS/IMAGE.jpg)")  # fmt: skip
    if len(counts) < 2:
        raise UserError(f"fit {root}: only one class ({next(iter(counts))}); a classifier needs "
                        "at least two class folders")  # fmt: skip
    images = [f for c in classes for f in list_image_files(c)]
    reasons = [
        f"task label (multiclass): {len(counts)} class folders in {train}: "
        + ", ".join(f"{c} {n}" for c, n in counts.items()),
        "validation: the split folder" if {"validation", "val"} & set(split_names)
        else "validation: 20% of each class's images, carved with the recipe's seed",
    ]  # fmt: skip
    data = {"source": "imagefolder", "path": str(root), "val_stratify": True}
    if "test" in split_names:  # kept for `eval --split test`; no run trains on it
        data["test_split"] = "test"
    recipe = {"tasks": {"label": {"kind": "multiclass"}}, "data": data,
              "_train_rows": sum(counts.values())}  # fmt: skip
    return recipe, reasons, images


def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, dtype=str, sep="\t" if suffix == ".tsv" else ",",
                               keep_default_na=False)  # fmt: skip
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_json(path, lines=suffix != ".json", dtype=False)
    except (OSError, ValueError) as err:
        raise UserError(f"fit {path}: cannot read the table ({err})") from None


def _table(path: Path, forced: dict, ignore: set, image_column: str | None):
    frame = _read_table(path)
    columns = list(frame.columns)
    for column in [*forced, *ignore, *([image_column] if image_column else [])]:
        if column not in columns:
            raise UserError(f"fit {path}: no column {column!r} (columns: {', '.join(columns)})")
    image = image_column or _find_image_column(frame, path)
    files = [_resolve(v, path.parent) for v in frame[image].tolist()[:2000] if _present(v)]
    tasks, reasons = {}, [f"images: column {image!r}, {len(frame)} rows"]
    for column in columns:
        if column in (image, "split") or column in ignore:
            continue
        values = [v for v in frame[column].tolist() if _present(v)]
        kind, why = (forced[column], "as --task says") if column in forced else _kind(values)
        if kind is None:
            raise UserError(
                f"fit {path}: column {column!r} {why}; say what it is with --task {column}=KIND "
                f"(one of {', '.join(TASK_KINDS)}) or leave it out with --ignore {column}"
            )
        tasks[column] = {"kind": kind}
        missing = len(frame) - len(values)
        reasons.append(f"task {column} ({kind}): {why}"
                       + (f"; {missing} rows without a label" if missing else ""))  # fmt: skip
    if not tasks:
        raise UserError(f"fit {path}: no column besides the images holds labels")
    train_rows, data_extra = len(frame), {}
    if "split" in columns:
        split = frame["split"].astype(str).str.lower()
        train_rows = int((split == "train").sum())
        reasons.append(f"splits: the split column ({dict(Counter(split))})")
        if not split.isin(["validation", "val"]).any():
            reasons.append(_carved(tasks))
        if (split == "test").any():  # kept for `eval --split test`; no run trains on it
            data_extra["test_split"] = "test"
    else:
        reasons.append(_carved(tasks))
    data = {"source": "manifest", "path": str(path), "image_column": image, "val_stratify": True,
            **data_extra}  # fmt: skip
    return {"tasks": tasks, "data": data, "_train_rows": train_rows}, reasons, files


def save_data_objects(data, where: Path) -> Path:
    """A `datasets.Dataset` or `DatasetDict`, or a list of (image, labels) pairs (an image: a
    PIL image or a path; labels: one value, for a task `label`, or a dict of task -> value),
    saved with `save_to_disk` at `where`, for `fit` to read like any saved dataset."""
    import datasets

    if not isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        if not isinstance(data, (list, tuple)) or not data:
            raise UserError(f"fit: DATA must be a path, a datasets.Dataset or DatasetDict, or a "
                            f"non-empty list of (image, labels) pairs, not {type(data).__name__}")  # fmt: skip
        rows = []
        for index, item in enumerate(data):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise UserError(f"fit: item {index} of the list is not an (image, labels) pair")
            image, labels = item
            image = str(image) if isinstance(image, Path) else image
            rows.append(
                {"image": image, **(labels if isinstance(labels, dict) else {"label": labels})}
            )
        data = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    where.parent.mkdir(parents=True, exist_ok=True)
    data.save_to_disk(str(where))
    return where


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()


def _saved(path: Path, forced: dict, ignore: set, image_column: str | None):
    """A `datasets` dataset saved with `save_to_disk`: its features are taken as they are
    (ClassLabel: multiclass, or binary with two names; a sequence of ClassLabel: multilabel;
    a float Value: regression); other columns are typed by their values, as a table's."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    train = splits.get("train") or next(iter(splits.values()))
    features = train.features
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    image = image_column or (images[0] if images else None)
    if image is None or image not in features:
        raise UserError(f"fit {path}: no Image column in the dataset's features "
                        f"({', '.join(features)}); name it with --image-column")  # fmt: skip
    tasks, reasons = {}, [f"images: feature {image!r}; splits: {', '.join(splits)} "
                          f"({', '.join(str(len(d)) for d in splits.values())} rows)"]  # fmt: skip
    for column, feature in features.items():
        if column == image or column in ignore or isinstance(feature, datasets.Image):
            continue
        kind, why = (forced[column], "as --task says") if column in forced else _feature_kind(
            feature, [v for v in train[column] if _present(v)])  # fmt: skip
        if kind is None:
            raise UserError(f"fit {path}: column {column!r} {why}; say what it is with --task "
                            f"{column}=KIND or leave it out with --ignore {column}")  # fmt: skip
        tasks[column] = {"kind": kind}
        reasons.append(f"task {column} ({kind}): {why}")
    if not tasks:
        raise UserError(f"fit {path}: no column besides the images holds labels")
    val = [s for s in splits if s in ("validation", "val", "valid")]
    reasons.append(f"validation: the {val[0]} split" if val else _carved(tasks))
    data = {"source": "disk", "path": str(path), "image_column": image, "val_stratify": True}
    if val:
        data["val_split"] = val[0]
    sample = [train[i][image] for i in range(0, len(train), max(1, len(train) // 24))][:24]
    return {"tasks": tasks, "data": data, "_train_rows": len(train)}, reasons, sample


def _feature_kind(feature, values: list) -> tuple[str | None, str]:
    import datasets

    inner = getattr(feature, "feature", None)
    if isinstance(feature, datasets.ClassLabel):
        n = feature.num_classes
        return ("binary" if n == 2 else "multiclass"), f"a ClassLabel feature with {n} names"
    if isinstance(inner, datasets.ClassLabel):
        return "multilabel", f"a sequence of ClassLabel ({inner.num_classes} names)"
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
        return "regression", f"a {feature.dtype} Value"
    return _kind(values)


def _carved(tasks: dict) -> str:
    """The plan's line for a validation split carved from the training rows."""
    first = next((n for n, t in tasks.items() if t["kind"] in ("multiclass", "binary")), None)
    by = f"of each {first} class " if first else ""
    return f"validation: 20% of the training rows {by}(stratified), carved with the recipe's seed"


def _present(value) -> bool:
    if value is None or (isinstance(value, float) and value != value):
        return False
    return not (isinstance(value, str) and value.strip() in ("", "-", "[]"))


def _find_image_column(frame, path: Path) -> str:
    for column in frame.columns:
        if column.lower() in _IMAGE_NAMES:
            return column
    for column in frame.columns:
        sample = [str(v) for v in frame[column].tolist()[:20] if _present(v)]
        if sample and all(Path(v).suffix.lower() in IMAGE_EXTENSIONS for v in sample):
            return column
    raise UserError(f"fit {path}: no column holds image paths; name it with --image-column")


def _resolve(value, base: Path) -> Path:
    candidate = Path(str(value)).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def _kind(values: list) -> tuple[str | None, str]:
    """A column's task kind from its labelled values, and why (kind None: cannot tell)."""
    if not values:
        return None, "has no value at all"
    if any(isinstance(v, (list, tuple)) for v in values) or any(
        isinstance(v, str) and any(s in v for s in _SEPARATORS) for v in values
    ):
        return "multilabel", "lists of labels (separated by ; or |)"
    distinct = {str(v).strip() for v in values}
    numbers = [_number(v) for v in values]
    if len(distinct) == 2:
        return "binary", f"two values ({', '.join(sorted(distinct))})"
    if len(distinct) < 2:
        return None, f"has one value only ({next(iter(distinct))!r}): nothing to learn"
    if all(n is not None for n in numbers):
        fractional = any(n != int(n) for n in numbers)
        if fractional or len(distinct) > _MAX_NUMBER_CLASSES:
            spread = f"{min(numbers):g} to {max(numbers):g}"
            return "regression", f"numbers from {spread}, {len(distinct)} distinct"
        return "multiclass", f"{len(distinct)} whole numbers, taken as classes"
    if len(distinct) <= _MAX_CLASSES and len(distinct) <= max(2, len(values) // 2):
        return "multiclass", f"{len(distinct)} classes"
    return None, f"has {len(distinct)} distinct texts in {len(values)} rows (an id or a caption?)"


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _image_size(files: list) -> tuple[int, str]:
    """A multiple of 32 near the images' median short side, from 64 to 224: ImageNet
    backbones downsample 32 times, so at 32 px their last feature map is a single pixel."""
    sides = []
    for file in files[:: max(1, len(files) // 24)][:24]:
        try:
            image = file if hasattr(file, "size") else open_image(str(file))  # PIL, or a path
            sides.append(min(image.size))
        except Exception:  # an unreadable file is the data loader's to report
            continue
    if not sides:
        return 224, "no image could be read to measure; the backbone's 224"
    median = statistics.median(sides)
    size = int(min(224, max(64, round(median / 32) * 32)))
    return size, f"the images' median short side is {median:g} px"


def _epochs(train_rows: int) -> tuple[int, int]:
    """(epochs, the first fine-tuning epoch): more epochs for few images, where an epoch is a
    handful of steps; the probe takes half."""
    epochs = 16 if train_rows <= 2000 else 10 if train_rows <= 20000 else 6
    return epochs, epochs // 2
