"""Image transforms built from the backbone's `DataConfig`: eval preprocessing with
torchvision.transforms.v2, training augmentation with timm's `create_transform`.

Geometric and colour steps run on the PIL image (PIL supports every interpolation timm may name,
tensors do not), then the image becomes a normalized float tensor `[3, H, W]`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from transferkit.core import DataConfig, Preprocessing
from transferkit.data.config import AUGMENTS, AugmentLibrary, DataSection
from transferkit.errors import UserError, did_you_mean

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


# The presets as timm settings (create_transform's arguments beyond size and flip).
_PRESETS = {
    "light": {"auto_augment": None, "re_prob": 0.0},
    "strong": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25},
}
# TrivialAugment (Müller & Hutter, 2021): one op per image at a magnitude drawn uniformly up to
# the maximum, always applied; timm has no name for it, so it is RandAugment configured so, on
# RandAugment's ops and ranges (not TrivialAugment's "wide" ones).
_ALIASES = {"trivialaugment": "rand-n1-m10-mstd101-p1.0"}
_SCALE = (0.6, 1.0)  # random-resized-crop area range: mild, for small fine-tuning sets


def build_transforms(
    data_config: DataConfig,
    train: bool,
    augment: str = "light",
    image_size: int | None = None,
    hflip: bool = True,
    *,
    random_erasing: float | None = None,
    scale: tuple[float, float] | list[float] | None = None,
    library: AugmentLibrary = "timm",
) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """PIL image -> normalized float tensor `[3, size, size]`, size = image_size or the config's.

    Eval (and train with augment "none"): resize the short side to size / crop_pct, center crop.
    Train: timm's `create_transform`: a random resized crop (area `scale`, default 0.6-1), a
    horizontal flip unless `hflip` is False (digits, text: `data.horizontal_flip`), then the
    policy: "light" none, "strong" RandAugment rand-m9-mstd0.5-inc1 with random erasing 0.25,
    or a timm policy string (`_augment_policy`). `random_erasing` overrides the erasing
    probability. Randomness comes from torch's, Python's and NumPy's global RNGs (the dataset
    seeds all three per sample). `library` "torchvision": the hand-built presets of older runs.
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
        return _EvalTransform(spec.resize_to, size, interpolation, data_config)
    if library == "torchvision":
        return _torchvision_preset(augment, size, interpolation, hflip, to_tensor)
    from timm.data import create_transform

    _use_safe_posterize()  # before the policy's ops look their functions up
    preset = _PRESETS.get(augment) or {"auto_augment": _augment_policy(augment), "re_prob": 0.0}
    re_prob = preset["re_prob"] if random_erasing is None else random_erasing
    return create_transform(
        size, is_training=True, scale=tuple(scale or _SCALE), hflip=0.5 if hflip else 0.0,
        color_jitter=None, auto_augment=preset["auto_augment"],
        interpolation=spec.interpolation, mean=tuple(data_config.mean),
        std=tuple(data_config.std), re_prob=re_prob, re_mode="pixel",
    )  # fmt: skip


class _EvalTransform:
    """Resize (antialiased), center crop, to a float tensor in [0, 1], normalize: what
    `v2.Compose([Resize, CenterCrop, ToImage, ToDtype, Normalize])` gives, bit for bit, without
    the per-transform dispatch that cost more than the work itself on small images (0.2 ms an
    image): v2's resize and crop kernels, then its tensor steps' arithmetic written out.
    `deterministic`: the dataset need not seed it."""

    deterministic = True

    def __init__(self, resize_to, size: int, interpolation, data_config: DataConfig) -> None:
        self.resize_to, self.size, self.interpolation = resize_to, size, interpolation
        self.mean, self.std = list(data_config.mean), list(data_config.std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        # Described as the Compose it stands for: the feature cache keys entries by this text,
        # so entries written before keep their keys.
        self._described = repr(v2.Compose([
            v2.Resize(resize_to, interpolation=interpolation, antialias=True), v2.CenterCrop(size),
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=self.mean, std=self.std),
        ]))  # fmt: skip

    def __repr__(self) -> str:
        return self._described

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        image = F.resize(image, self.resize_to, interpolation=self.interpolation, antialias=True)
        image = F.center_crop(image, self.size)
        # v2's to_image, to_dtype(scale) and normalize, the same arithmetic without their
        # checks and dispatch: HWC bytes seen as CHW, times 1/255, minus mean, over std.
        pixels = torch.from_numpy(np.array(image)).view(image.height, image.width, -1)
        pixels = pixels.permute(2, 0, 1)
        pixels = pixels.to(torch.float32).mul_(1.0 / 255)
        return pixels.sub(self._mean).div_(self._std)  # (a gray image broadcasts to three)


def _posterize_at_least_one_bit(img, bits_to_keep, **_):
    """timm's posterize, with at least one bit kept: timm maps RandAugment's top magnitude
    (reached through `mstd` noise, e.g. in rand-m9-mstd0.5-inc1) to 0 bits, which Pillow 11+
    refuses with a ValueError, about once in 500 images, ending the epoch. 0 bits was a black
    image; 1 bit is as near as Pillow allows."""
    from PIL import ImageOps

    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, int(bits_to_keep)))


def _use_safe_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize_at_least_one_bit


def _augment_policy(augment: str) -> str:
    """timm's policy string for `data.augment` (an alias resolved), or one clear error."""
    from timm.data import create_transform

    policy = _ALIASES.get(augment, augment)
    try:  # timm's parser is the judge of its own strings
        create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise UserError(
            f"recipe key data.augment: {augment!r} is neither a preset ({', '.join(AUGMENTS)}) "
            "nor a timm policy (e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0, 3a, "
            f"trivialaugment): {err or type(err).__name__}.{did_you_mean(augment, AUGMENTS)}"
        ) from None
    return policy


def check_augment(data: DataSection) -> list[str]:
    """The recipe errors of `data.augment`, `random_erasing`, `scale` and `augment_library`."""
    errors = []
    if data.augment not in AUGMENTS:
        try:
            _augment_policy(data.augment)
        except UserError as err:
            errors.append(str(err))
    scale = data.scale
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        errors.append(f"recipe key data.scale: two areas 0 < min <= max <= 1, got {scale}")
    if data.augment_library == "torchvision":
        if data.augment not in AUGMENTS:
            errors.append("recipe key data.augment: timm policies need data.augment_library: timm")
        if data.random_erasing is not None or scale is not None:
            errors.append("recipe keys data.random_erasing and data.scale need "
                          "data.augment_library: timm")  # fmt: skip
    return errors


def _torchvision_preset(augment: str, size: int, interpolation, hflip: bool, to_tensor: list):
    """The presets as runs made before timm built them trained with (kept so they resume
    exactly): "light": RandomResizedCrop(scale 0.6-1) + horizontal flip; "strong": light +
    RandAugment + RandomErasing(p=0.25)."""
    steps = [
        v2.RandomResizedCrop(size, scale=_SCALE, interpolation=interpolation, antialias=True),
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
