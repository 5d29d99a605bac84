"""Task sets for `make bench-fit`, built offline from what ships with the installed packages.

Each set is a folder of 64 px PNGs and one `manifest.csv` (an `image` column, one column per
task, empty cells for missing labels, a `split` column: `train` or `test`). `labelled(set, K,
seed)` draws K training images per class of the set's first task (a different draw per
seed); the test images are the same for every draw and no run sees them.

- digits:  scikit-learn's handwritten digit scans (8 x 8, upscaled): digit (10 classes), parity
           (binary), ink (regression, the mean pixel).
- glyphs:  the letters A-K (no I) in the fonts matplotlib ships (DejaVu, STIX, Computer
           Modern), at random sizes, angles, places and colours: letter (10), serif (binary),
           bold (binary); a fifth of the serif and bold labels are missing.
- shapes:  one to four copies of a shape (circle, square, triangle, cross, ring) in one colour
           on a noisy gradient: shape (5), colour (4), count (regression, 1-4); a fifth of the
           counts are missing.
- crops:   crops of scikit-learn's two sample photos (a temple in China, a flower), 64 to 160
           px, resized: region (6: photo x top, middle or bottom third), brightness
           (regression); a fifth of the brightness values are missing. Held out: no choice of
           `fit` or of this benchmark was tuned on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

SIZE = 64
SETS = ("digits", "glyphs", "shapes", "crops")
HELD_OUT = "crops"
PRIMARY = {"digits": "digit", "glyphs": "letter", "shapes": "shape", "crops": "region"}
KINDS = {
    "digits": {"digit": "multiclass", "parity": "binary", "ink": "regression"},
    "glyphs": {"letter": "multiclass", "serif": "binary", "bold": "binary"},
    "shapes": {"shape": "multiclass", "colour": "multiclass", "count": "regression"},
    "crops": {"region": "multiclass", "brightness": "regression"},
}
POOL_PER_CLASS = 60  # training images per class to draw from
TEST_PER_CLASS = 30
_MISSING = 0.2


def build(root: Path, name: str) -> Path:
    """The set's folder (built once): images and manifest.csv; returns the manifest."""
    manifest = root / name / "manifest.csv"
    if manifest.is_file():
        return manifest
    (root / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    rows = {"digits": _digits, "glyphs": _glyphs, "shapes": _shapes, "crops": _crops}[name](
        root / name, rng
    )
    frame = pd.DataFrame(rows)
    frame.to_csv(manifest, index=False)
    return manifest


def labelled(root: Path, name: str, per_class: int, seed: int) -> Path:
    """A manifest with `per_class` training images per primary class (drawn by `seed`) and the
    set's test images; `fit` carves its own validation split from the training rows."""
    frame = pd.read_csv(build(root, name), dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    train = frame[frame["split"] == "train"]
    picked = [rng.choice(group.index.to_numpy(), per_class, replace=False)
              for _, group in train.groupby(PRIMARY[name])]  # fmt: skip
    rows = pd.concat([frame.loc[np.sort(np.concatenate(picked))], frame[frame["split"] == "test"]])
    path = root / name / f"k{per_class}_seed{seed}.csv"
    rows.to_csv(path, index=False)
    return path


def _split_rows(per_class_total: int) -> list[str]:
    return ["train"] * POOL_PER_CLASS + ["test"] * (per_class_total - POOL_PER_CLASS)


def _save(folder: Path, index: int, image: Image.Image) -> str:
    name = f"{index:05d}.png"
    image.resize((SIZE, SIZE), Image.BILINEAR).save(folder / name)
    return name


def _drop(rng, value):
    return "" if rng.random() < _MISSING else value


def _digits(folder: Path, rng) -> list[dict]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for digit in range(10):
        found = np.flatnonzero(digits.target == digit)
        chosen = rng.permutation(found)[: POOL_PER_CLASS + TEST_PER_CLASS]
        for split, i in zip(_split_rows(len(chosen)), chosen):
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            name = _save(folder, len(rows), Image.fromarray(pixels).convert("RGB"))
            rows.append({"image": name, "digit": str(digit), "parity": "even" if digit % 2 == 0
                         else "odd", "ink": f"{pixels.mean() / 255:.4f}", "split": split})  # fmt: skip
    return rows


_LETTERS = "ABCDEFGHJK"
_FONTS = {  # file: (serif, bold)
    "DejaVuSans.ttf": ("no", "no"), "DejaVuSans-Bold.ttf": ("no", "yes"),
    "DejaVuSerif.ttf": ("yes", "no"), "DejaVuSerif-Bold.ttf": ("yes", "yes"),
    "DejaVuSansMono.ttf": ("no", "no"), "DejaVuSansMono-Bold.ttf": ("no", "yes"),
    "STIXGeneral.ttf": ("yes", "no"), "STIXGeneralBol.ttf": ("yes", "yes"),
    "cmr10.ttf": ("yes", "no"), "cmb10.ttf": ("yes", "yes"), "cmss10.ttf": ("no", "no"),
}  # fmt: skip


def _glyphs(folder: Path, rng) -> list[dict]:
    import matplotlib

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    rows = []
    for letter in _LETTERS:
        for split in _split_rows(POOL_PER_CLASS + TEST_PER_CLASS):
            file = list(_FONTS)[rng.integers(len(_FONTS))]
            serif, bold = _FONTS[file]
            background = tuple(int(v) for v in rng.integers(0, 120, 3))
            ink = tuple(int(v) for v in rng.integers(150, 256, 3))
            canvas = Image.new("RGB", (96, 96), background)
            font = ImageFont.truetype(str(fonts / file), int(rng.integers(38, 64)))
            ImageDraw.Draw(canvas).text((48 + rng.integers(-10, 11), 48 + rng.integers(-10, 11)),
                                        letter, fill=ink, font=font, anchor="mm")  # fmt: skip
            canvas = canvas.rotate(float(rng.uniform(-20, 20)), fillcolor=background)
            name = _save(folder, len(rows), canvas)
            rows.append({"image": name, "letter": letter, "serif": _drop(rng, serif),
                         "bold": _drop(rng, bold), "split": split})  # fmt: skip
    return rows


_SHAPES = ("circle", "square", "triangle", "cross", "ring")
_COLOURS = {"red": (220, 50, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
            "yellow": (230, 210, 40)}  # fmt: skip


def _shapes(folder: Path, rng) -> list[dict]:
    rows = []
    for shape in _SHAPES:
        for split in _split_rows(POOL_PER_CLASS + TEST_PER_CLASS):
            colour = list(_COLOURS)[rng.integers(len(_COLOURS))]
            count = int(rng.integers(1, 5))
            base = rng.integers(60, 200, 3)
            ramp = np.linspace(0, 1, 96)[None, :, None] * rng.integers(-50, 50, 3)
            pixels = np.clip(base + ramp + rng.normal(0, 12, (96, 96, 3)), 0, 255)
            canvas = Image.fromarray(pixels.astype(np.uint8))
            draw = ImageDraw.Draw(canvas)
            for cell in rng.permutation(4)[:count]:  # one shape per quadrant
                r = int(rng.integers(9, 15))
                cx = 24 + 48 * (cell % 2) + int(rng.integers(-4, 5))
                cy = 24 + 48 * (cell // 2) + int(rng.integers(-4, 5))
                _draw_shape(draw, shape, cx, cy, r, _COLOURS[colour])
            name = _save(folder, len(rows), canvas)
            rows.append({"image": name, "shape": shape, "colour": colour,
                         "count": _drop(rng, str(count)), "split": split})  # fmt: skip
    return rows


def _draw_shape(draw, shape: str, x: int, y: int, r: int, fill) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    elif shape == "cross":
        draw.rectangle((x - r, y - r // 3, x + r, y + r // 3), fill=fill)
        draw.rectangle((x - r // 3, y - r, x + r // 3, y + r), fill=fill)
    else:
        draw.ellipse((x - r, y - r, x + r, y + r), outline=fill, width=max(3, r // 3))


def _crops(folder: Path, rng) -> list[dict]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rows = []
    for photo, image in zip(("temple", "flower"), photos.images):
        height, width = image.shape[:2]
        for third, band in enumerate(("top", "middle", "bottom")):
            for split in _split_rows(POOL_PER_CLASS + TEST_PER_CLASS):
                side = int(rng.integers(64, 161))
                top = int(rng.integers(third * height // 3, (third + 1) * height // 3 - side // 2))
                top = min(max(top, 0), height - side)
                left = int(rng.integers(0, width - side))
                crop = image[top : top + side, left : left + side]
                brightness = float(crop.mean() / 255)
                name = _save(folder, len(rows), Image.fromarray(crop))
                rows.append({"image": name, "region": f"{photo}-{band}",
                             "brightness": _drop(rng, f"{brightness:.4f}"), "split": split})  # fmt: skip
    return rows
