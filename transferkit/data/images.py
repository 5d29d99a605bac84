"""Opening images strictly, finding unreadable ones up front, and reading images to predict on.

An image is "readable" only if it decodes completely: `PIL.Image.verify()` accepts a truncated
JPEG, so every check here calls `load()`, with `ImageFile.LOAD_TRUNCATED_IMAGES` off.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import PIL.ImageOps
from PIL import ImageFile

from transferkit.errors import UserError

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jfif",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
    }
)


def list_image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, by extension, hidden entries skipped), sorted."""
    files = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files)


def open_image(source: Any) -> PIL.Image.Image:
    """Fully decode an image and return it in RGB.

    `source` is a path, a `datasets.Image` storage dict (`{"bytes", "path"}`), raw bytes or a PIL
    image. Raises whatever PIL raises for an unreadable image (callers decide skip or error).
    """
    # Another library may have switched this on; it would hide truncated files, so force it off.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if isinstance(source, PIL.Image.Image):
        image = source
    elif isinstance(source, dict):
        if source.get("bytes") is not None:
            image = PIL.Image.open(BytesIO(source["bytes"]))
        elif source.get("path"):
            image = PIL.Image.open(source["path"])
        else:
            raise ValueError("no image (empty bytes and path)")
    elif isinstance(source, (bytes, bytearray)):
        image = PIL.Image.open(BytesIO(source))
    elif isinstance(source, (str, os.PathLike)):
        image = PIL.Image.open(source)
    else:
        raise ValueError("no image" if source is None else f"not an image: {type(source).__name__}")
    image.load()
    # Same orientation handling as `datasets.Image`, so training and prediction see the same pixels.
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes to RGB
    return image if image.mode == "RGB" else image.convert("RGB")


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
