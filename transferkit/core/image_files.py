"""Image files without torch: which files are images, and decoding one the way training does.

Torch-free on purpose: the ONNX inference path (`transferkit.inference.onnx_run`) decodes images with this
module and must not import torch. `transferkit.data.images` re-exports these names.

An image is "readable" only if it decodes completely: `PIL.Image.verify()` accepts a truncated
JPEG, so `open_image` calls `load()`, with `ImageFile.LOAD_TRUNCATED_IMAGES` off.
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from PIL import ImageFile

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
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8_bit(image)  # PIL's own conversion clips: a 16-bit scan comes out white
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16- or 32-bit integer or float grayscale image scaled to 8 bits by its real range:
    16-bit files by 0-65535; 32-bit integers by 0-255 or 0-65535 when their values fit, floats
    by 0-1 or 0-255 when theirs do; anything else by the image's own minimum and maximum."""
    pixels = np.asarray(image, dtype=np.float64)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        low, top = 0.0, 65535.0
    elif low >= 0 and high <= (1.0 if image.mode == "F" else 255.0):
        low, top = 0.0, 1.0 if image.mode == "F" else 255.0
    elif low >= 0 and high <= (255.0 if image.mode == "F" else 65535.0):
        low, top = 0.0, 255.0 if image.mode == "F" else 65535.0
    else:
        top = high if high > low else low + 1.0
    scaled = np.clip(np.round((pixels - low) / (top - low) * 255.0), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(scaled, mode="L")
