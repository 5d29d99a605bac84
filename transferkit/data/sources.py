"""Read a recipe's data source into `datasets.Dataset` splits with an image column.

`read_source` returns `{split name: Dataset}`; the recipe's image column is always a decodable
`datasets.Image` feature there (path strings are resolved and cast), whatever the source held.
Label columns are left as they are: `labels.py` interprets them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import datasets

from transferkit.data.config import DataSection
from transferkit.data.images import list_image_files
from transferkit.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

# Split names as folders, manifest values or recipe keys may spell them.
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing"),
}


def canonical_split(name: str) -> str | None:
    """'val' -> 'validation', 'training' -> 'train', ...; None for other names."""
    lowered = name.strip().lower()
    for canonical, aliases in SPLIT_ALIASES.items():
        if lowered in aliases:
            return canonical
    return None


def find_split(splits: dict[str, datasets.Dataset], name: str) -> str | None:
    """The key of `splits` that the recipe's split `name` means (exact, then by alias)."""
    if name in splits:
        return name
    canonical = canonical_split(name)
    for key in splits:
        if canonical is not None and canonical_split(key) == canonical:
            return key
    return None


def read_source(data: DataSection) -> dict[str, datasets.Dataset]:
    """Load every split of the recipe's data source (`data.source`, `data.path`)."""
    source = data.source
    if source == "hub":
        return prepare_images(_read_hub(data), data, bases=[])
    path = Path(data.path).expanduser()
    if not path.exists():
        raise UserError(f"data.path: {data.path} does not exist (data.source: {source})")
    if source == "imagefolder":
        return _read_imagefolder(path, data)
    if source == "manifest":
        return prepare_images(_read_manifest(path), data, bases=[path.parent])
    return prepare_images(_read_disk(path), data, bases=[path, Path.cwd()])


# ------------------------------------------------------------------------------------ sources
def _read_imagefolder(root: Path, data: DataSection) -> dict[str, datasets.Dataset]:
    """root/CLASS/*.jpg, or root/SPLIT/CLASS/*.jpg when every sub-folder is a split name."""
    if not root.is_dir():
        raise UserError(f"data.path: {root} is not a folder (data.source: imagefolder)")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and all(canonical_split(p.name) for p in subdirs):
        split_dirs = {canonical_split(p.name): p for p in subdirs}
    else:
        split_dirs = {"train": root}
    files = {}
    for name, folder in split_dirs.items():
        classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        files[name] = [(f, c.name) for c in classes for f in list_image_files(c)]
        if not files[name]:
            raise UserError(
                f"data.path: no images in class sub-folders of {folder}; imagefolder expects "
                f"one sub-folder per class ({folder}/CLASS/IMAGE.jpg)"
            )
    # One class list for every split, so a class missing from one split keeps its index.
    names = sorted({label for pairs in files.values() for _, label in pairs})
    index = {name: i for i, name in enumerate(names)}
    features = datasets.Features(
        {data.image_column: datasets.Image(), "label": datasets.ClassLabel(names=names)}
    )
    return {
        split: datasets.Dataset.from_dict(
            {
                data.image_column: [str(f) for f, _ in pairs],
                "label": [index[label] for _, label in pairs],
            },
            features=features,
        )
        for split, pairs in files.items()
    }


def _read_manifest(path: Path) -> dict[str, datasets.Dataset]:
    """A CSV / JSON / JSONL / Parquet table; an optional `split` column assigns rows to splits."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".parquet", ".pq"):
        raise UserError(
            f"data.path: manifest {path} must be a .csv, .tsv, .json, .jsonl or .parquet file"
        )
    try:
        if suffix in (".csv", ".tsv"):
            # Read as text: pandas would turn class names such as "007" into the number 7.
            frame = pd.read_csv(path, dtype=str, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            # dtype=False keeps JSON's own types; a .json file may also hold JSON Lines.
            try:
                frame = pd.read_json(
                    path, lines=suffix != ".json", dtype=False, convert_dates=False
                )
            except ValueError:
                frame = pd.read_json(path, lines=True, dtype=False, convert_dates=False)
    except (OSError, ValueError) as err:
        raise UserError(f"data.path: cannot read manifest {path}: {err}") from err
    groups = {"train": frame}
    if "split" in frame.columns:
        names = frame["split"].map(lambda v: "train" if pd.isna(v) else canonical_split(str(v)))
        unknown = sorted({str(v) for v, n in zip(frame["split"], names) if n is None})
        if unknown:
            raise UserError(
                f"{path}: column 'split' has values {', '.join(unknown)}; "
                "use train, validation or test"
            )
        groups = {n: frame[names == n].drop(columns="split") for n in names.unique()}
    try:
        return {
            name: datasets.Dataset.from_pandas(group.reset_index(drop=True), preserve_index=False)
            for name, group in groups.items()
        }
    except Exception as err:  # pyarrow rejects columns that mix types
        raise UserError(f"data.path: cannot convert manifest {path}: {err}") from err


def _read_disk(path: Path) -> dict[str, datasets.Dataset]:
    """A `Dataset` or `DatasetDict` saved with `save_to_disk`; a lone Dataset is the train split."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise UserError(
            f"data.path: {path} is not a dataset saved with save_to_disk: {err}"
        ) from err
    except Exception as err:  # e.g. datasets cannot reload a split saved with 0 rows
        raise UserError(
            f"data.path: cannot load the saved dataset {path} ({type(err).__name__}: {err})"
        ) from err
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _is_offline() -> bool:
    import huggingface_hub.constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
    return (
        any(str(f).upper() in ("1", "ON", "YES", "TRUE") for f in flags if f)
        or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
        or bool(getattr(datasets.config, "HF_DATASETS_OFFLINE", False))
        or bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    )


def _read_hub(data: DataSection) -> dict[str, datasets.Dataset]:
    """`datasets.load_dataset(data.path)`; a clear error when it is neither cached nor reachable."""
    # Only pass trust_remote_code when the recipe opts in: it runs code from the dataset repo.
    kwargs = {"trust_remote_code": True} if getattr(data, "trust_remote_code", False) else {}
    local = "or use a local copy (data.source: imagefolder, manifest or disk with data.path)"
    try:
        loaded = datasets.load_dataset(data.path, **kwargs)
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if _is_offline():
            raise UserError(
                f"data.path: hub dataset {data.path!r} is not in the local Hugging Face cache and "
                f"offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); download it once "
                f"while online {local}"
            ) from err
        raise UserError(
            f"data.path: cannot load hub dataset {data.path!r} ({detail}); "
            f"check the name and the network, {local}"
        ) from err
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


# ------------------------------------------------------------------------------------ images
def prepare_images(
    splits: dict[str, datasets.Dataset], data: DataSection, bases: list[Path]
) -> dict[str, datasets.Dataset]:
    """Make the image column a decodable `Image` feature in every split."""
    column = data.image_column
    for name, split in splits.items():
        if column not in split.column_names:
            raise UserError(
                f"data.image_column: no column {column!r} in split {name!r} of {data.path}."
                f"{did_you_mean(column, split.column_names)} "
                f"Available columns: {', '.join(split.column_names)}"
            )
        feature = split.features[column]
        if isinstance(feature, datasets.Image):
            if not feature.decode:
                split = split.cast_column(column, datasets.Image())
        elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            paths = [_resolve(p, bases) for p in split[column][:]]
            split = split.remove_columns(column).add_column(column, paths)
            split = split.cast_column(column, datasets.Image())
        else:  # binary bytes or a {bytes, path} struct, e.g. from Parquet
            try:
                split = split.cast_column(column, datasets.Image())
            except Exception as err:
                raise UserError(
                    f"data.image_column: column {column!r} of {data.path} holds {feature}, "
                    "not images, image bytes or image paths"
                ) from err
        splits[name] = split
    return splits


def _resolve(path: str | None, bases: list[Path]) -> str | None:
    """An absolute path: as given if absolute, else under the first base where it exists."""
    if path is None or not str(path).strip():
        return None  # reported as an unreadable image later, like a missing file
    candidate = Path(str(path).strip()).expanduser()
    if candidate.is_absolute() or not bases:
        return str(candidate)
    for base in bases:
        if (base / candidate).exists():
            return str((base / candidate).resolve())
    return str(bases[0] / candidate)


def read_unlabeled(data: DataSection) -> datasets.Dataset:
    """`data.unlabeled`: every image of a folder, or of a manifest's `data.image_column`, as a
    one-column ("image") dataset of decodable images."""
    path = Path(data.unlabeled).expanduser()
    if path.is_dir():
        files = [str(p.resolve()) for p in list_image_files(path)]
        if not files:
            raise UserError(f"data.unlabeled: no image files under {path}")
        tables = {"unlabeled": datasets.Dataset.from_dict({data.image_column: files})}
    elif path.is_file():
        tables = _read_manifest(path)
    else:
        raise UserError(f"data.unlabeled: {path} is neither a folder of images nor a manifest")
    # A row number beside the images: `prepare_images` replaces the image column, which a
    # one-column table would lose its rows with.
    tables = {k: t.add_column("_row", list(range(len(t)))) for k, t in tables.items()}
    prepared = prepare_images(tables, replace(data, path=str(path)), bases=[path.parent])
    return datasets.concatenate_datasets(
        [t.select_columns([data.image_column]) for t in prepared.values()]
    )
