"""A run's eval preprocessing as plain data, and the same steps in PIL and NumPy without torch.

`Preprocessing` is what travels with an exported model (ONNX metadata, or a JSON beside a
TorchScript or torch.export file): the sizes, interpolation, mean and std. The torch eval
transform (`transferkit.data.build_transforms(train=False)`) takes its sizes and interpolation
from `Preprocessing.from_config`, so the two cannot drift apart; `__call__` repeats the steps of
torchvision's v2 transforms on a PIL image (PIL resize with antialiasing, center crop with zero
padding, scale to [0, 1], normalize), which tests check against the torch transform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import PIL.Image

# timm names interpolations as strings; PIL's resampling filters, as torchvision maps them.
PIL_RESAMPLING = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "box": PIL.Image.Resampling.BOX,
    "hamming": PIL.Image.Resampling.HAMMING,
}
FALLBACK_INTERPOLATION = "bilinear"  # timm's fallback too, for names such as "random"


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing that belongs to a set of weights (same fields as timm's data config)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataConfig:
        """Build from a dict such as timm's `resolve_model_data_config` output."""
        return cls(
            input_size=tuple(int(v) for v in data.get("input_size", cls.input_size)),
            mean=tuple(float(v) for v in data.get("mean", cls.mean)),
            std=tuple(float(v) for v in data.get("std", cls.std)),
            interpolation=str(data.get("interpolation", cls.interpolation)),
            crop_pct=float(data.get("crop_pct", cls.crop_pct) or cls.crop_pct),
            crop_mode=str(data.get("crop_mode", cls.crop_mode)),
        )


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing: resize (short side, or both sides when squashing), center crop to
    `size`, scale to [0, 1], normalize with `mean` and `std`; output `[3, size, size]` float32."""

    size: int
    resize: int  # the short side after resizing (both sides when crop_mode is "squash")
    crop_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, data_config: DataConfig, image_size: int | None = None) -> Preprocessing:
        """From a backbone's `DataConfig` (or any object with its fields) and the recipe's
        `data.image_size`, which wins over the config's input size."""
        size = int(image_size or data_config.input_size[1])
        name = str(data_config.interpolation).lower()
        return cls(
            size=size,
            resize=int(size / data_config.crop_pct),
            crop_mode=str(data_config.crop_mode),
            interpolation=name if name in PIL_RESAMPLING else FALLBACK_INTERPOLATION,
            mean=tuple(float(m) for m in data_config.mean),
            std=tuple(float(s) for s in data_config.std),
        )

    @property
    def resize_to(self) -> int | tuple[int, int]:
        """torchvision's `Resize` size: the short side, or (h, w) when squashing."""
        return (self.resize, self.resize) if self.crop_mode == "squash" else self.resize

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(mean=list(self.mean), std=list(self.std))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            size=int(data["size"]),
            resize=int(data["resize"]),
            crop_mode=str(data["crop_mode"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(m) for m in data["mean"]),
            std=tuple(float(s) for s in data["std"]),
        )

    def __call__(self, image: PIL.Image.Image) -> np.ndarray:
        """An RGB PIL image -> normalized float32 `[3, size, size]`."""
        image = self._resized(image)
        image = _center_crop(image, self.size)
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))

    def _resized(self, image: PIL.Image.Image) -> PIL.Image.Image:
        width, height = image.size
        if self.crop_mode == "squash":
            new_w = new_h = self.resize
        else:  # torchvision's _compute_resized_output_size for one int: the short side
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.resize, int(self.resize * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) == (width, height):
            return image
        return image.resize((new_w, new_h), resample=PIL_RESAMPLING[self.interpolation])


def _center_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """torchvision's center crop: pad with black where the image is smaller, then crop."""
    width, height = image.size
    if size > width or size > height:
        left = (size - width) // 2 if size > width else 0
        top = (size - height) // 2 if size > height else 0
        right = (size - width + 1) // 2 if size > width else 0
        bottom = (size - height + 1) // 2 if size > height else 0
        canvas = PIL.Image.new(image.mode, (width + left + right, height + top + bottom))
        canvas.paste(image, (left, top))
        image, (width, height) = canvas, canvas.size
        if (width, height) == (size, size):
            return image
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
