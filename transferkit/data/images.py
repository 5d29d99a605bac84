"""Finding unreadable images up front, and reading images to predict on.

Decoding itself (`open_image`) and listing image files live in the torch-free
`transferkit.core.image_files` and are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import PIL.Image

from transferkit.core import IMAGE_EXTENSIONS, list_image_files, open_image
from transferkit.errors import UserError


def image_id(source: Any, fallback: str) -> str:
    """A name for an image in messages: its path when it has one, else `fallback`."""
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return fallback


def _problem(source: Any) -> str | None:
    """Why `source` cannot be decoded, or None when it can."""
    try:
        open_image(source)
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(err).__name__}: {err}"
    return None


def find_bad_images(
    split: datasets.Dataset, column: str, split_name: str
) -> list[tuple[int, str, str]]:
    """`(row, id, reason)` for every image of `split[column]` that does not decode fully.

    Each image is decoded once. Decoding runs in threads (PIL releases the GIL while decoding)
    one batch at a time, so embedded image bytes are never all in memory together.
    """
    raw = split.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    bad: list[tuple[int, str, str]] = []
    row = 0
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in raw.iter(batch_size=256):
            items = batch[column]
            for offset, reason in enumerate(pool.map(_problem, items)):
                if reason is not None:
                    index = row + offset
                    bad.append((index, image_id(items[offset], f"{split_name}[{index}]"), reason))
            row += len(items)
    return bad


def decode_prediction_inputs(paths: Sequence[str]) -> list[tuple[str, PIL.Image.Image]]:
    """Images to predict on: each path is an image file or a folder (searched recursively).

    Returns `(path, RGB image)` pairs, files of a folder in sorted order. A missing path, a folder
    without images or an unreadable file raises `UserError` naming it.
    """
    if not paths:
        raise UserError("no images given: pass image files or folders to predict on")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = list_image_files(path)
            if not found:
                extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise UserError(f"no image files in folder {raw} (looked for {extensions})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"no such image file or folder: {raw}")
    results = []
    for file in files:
        try:
            results.append((str(file), open_image(file)))
        except Exception as err:
            raise UserError(f"cannot read image {file}: {type(err).__name__}: {err}") from err
    return results
