"""Image transforms built from the backbone's `DataConfig` (torchvision.transforms.v2).

Geometric and colour steps run on the PIL image (PIL supports every interpolation timm may name,
tensors do not), then the image becomes a normalized float tensor `[3, H, W]`.
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch
from torchvision.transforms import InterpolationMode, v2

from transferkit.core import DataConfig, Preprocessing
from transferkit.data.config import Augment

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def build_transforms(
    data_config: DataConfig,
    train: bool,
    augment: Augment = "light",
    image_size: int | None = None,
    hflip: bool = True,
) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """PIL image -> normalized float tensor `[3, size, size]`, size = image_size or the config's.

    Eval (and train with augment "none"): resize the short side to size / crop_pct, center crop.
    "light": RandomResizedCrop(scale 0.6-1) + horizontal flip; "strong": light + RandAugment +
    RandomErasing(p=0.25). Randomness comes from torch's global RNG. `hflip` False (digits,
    text: `data.horizontal_flip`) leaves the flip out.
    """
    # Sizes and interpolation as exported models record them (`Preprocessing`), defined once.
    spec = Preprocessing.from_config(data_config, image_size)
    size, interpolation = spec.size, _INTERPOLATIONS[spec.interpolation]
    to_tensor = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(data_config.mean), std=list(data_config.std)),
    ]
    if not train or augment == "none":
        # "squash" (some timm weights) resizes both sides instead of keeping the aspect ratio.
        steps = [
            v2.Resize(spec.resize_to, interpolation=interpolation, antialias=True),
            v2.CenterCrop(size),
        ]
        return v2.Compose(steps + to_tensor)
    steps = [
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=interpolation, antialias=True),
        *([v2.RandomHorizontalFlip()] if hflip else []),
    ]
    if augment == "light":
        return v2.Compose(steps + to_tensor)
    return v2.Compose(
        steps
        + [v2.RandAugment(interpolation=InterpolationMode.BILINEAR)]
        + to_tensor
        + [v2.RandomErasing(p=0.25)]
    )


def tta_views(images: torch.Tensor, views: list[str] | tuple[str, ...]) -> list[torch.Tensor]:
    """A preprocessed batch `[B, 3, H, W]` and its test-time views (`TTA_VIEWS`), same size.

    "hflip": the mirror image. "crops": the four corner crops and the center crop, each 7/8 of
    the side, resized back (bilinear) to the model's input size.
    """
    out = [images]
    if "hflip" in views:
        out.append(images.flip(-1))
    if "crops" in views:
        height, width = images.shape[-2:]
        h, w = max(1, round(height * 7 / 8)), max(1, round(width * 7 / 8))
        tops = (0, 0, height - h, height - h, (height - h) // 2)
        lefts = (0, width - w, 0, width - w, (width - w) // 2)
        for top, left in zip(tops, lefts):
            crop = images[..., top : top + h, left : left + w]
            out.append(
                torch.nn.functional.interpolate(
                    crop, size=(height, width), mode="bilinear", align_corners=False
                )
            )
    return out
