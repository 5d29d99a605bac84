"""Offline example data: the real handwritten digits that scikit-learn ships, as PNG files.

`write_digits(root)` writes two image sets with CSV manifests:
- `source/`: digits 0-4, one task (`digit`), for pretraining a small backbone;
- `transfer/`: digits 5-9, three tasks: `digit` (5-9), `parity` (even/odd) and `ink` (how much
  of the image is ink, standardized: a regression target), with a fifth of the parity and ink
  labels missing, as in real multi-task data.

`write_overlaid_digits(root)` writes a Multi-MNIST-like set: two digits overlaid in each image,
one shifted left and one shifted right, with two tasks (`left`, `right`) that compete for the
same pixels (a standard benchmark for conflicting tasks).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: str | Path, size: int = 32) -> Path:
    """Write the two example sets under `root` (skipped if already there); returns `root`."""
    from sklearn.datasets import load_digits

    root = Path(root)
    if (root / "transfer" / "manifest.csv").is_file() and (
        root / "source" / "manifest.csv"
    ).is_file():
        return root
    digits = load_digits()
    rng = np.random.default_rng(0)
    ink = digits.images.reshape(len(digits.images), -1).mean(1)
    ink = (ink - ink.mean()) / ink.std()
    for name, keep in (("source", range(0, 5)), ("transfer", range(5, 10))):
        folder = root / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (image, label) in enumerate(zip(digits.images, digits.target)):
            if label not in keep:
                continue
            pixels = (image / 16.0 * 255).astype(np.uint8)
            path = f"images/{i:04d}.png"
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(folder / path)
            row = {"image": path, "digit": str(label)}
            if name == "transfer":
                row["parity"] = "" if rng.random() < 0.2 else ("even" if label % 2 == 0 else "odd")
                row["ink"] = "" if rng.random() < 0.2 else f"{ink[i]:.4f}"
            rows.append(row)
        tmp = folder / "manifest.csv.tmp"
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(folder / "manifest.csv")
    return root


def write_few_labels(
    root: str | Path, per_class: int = 10, val_per_class: int = 40, seed: int = 0
) -> Path:
    """A few-label split of the transfer set (digits 5-9): `per_class` labelled training images
    and `val_per_class` validation images per digit, drawn without overlap (seeded), written as
    `transfer/few_<per_class>.csv` with a `split` column. Returns the manifest's path."""
    import pandas as pd

    root = write_digits(root)
    path = root / "transfer" / f"few_{per_class}.csv"
    if path.is_file():
        return path
    frame = pd.read_csv(root / "transfer" / "manifest.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    parts = []
    for _, rows in frame.groupby("digit"):
        order = rng.permutation(len(rows))
        picked = rows.iloc[order[: per_class + val_per_class]].copy()
        picked["split"] = ["train"] * per_class + ["validation"] * (len(picked) - per_class)
        parts.append(picked)
    tmp = path.with_suffix(".csv.tmp")
    pd.concat(parts).sort_values(["split", "image"]).to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def write_class_folders(root: str | Path, per_class: int = 10) -> Path:
    """The few-label split of digits 5-9 as a folder tree a user would bring to `fit`:
    `transfer/folders/{train,validation}/DIGIT/*.png`. Returns the tree's root."""
    import shutil

    import pandas as pd

    manifest = write_few_labels(root, per_class)
    tree = manifest.parent / "folders"
    if tree.is_dir():
        return tree
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    for row in frame.itertuples():
        folder = tree / row.split / row.digit
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(manifest.parent / row.image, folder / Path(row.image).name)
    return tree


def write_overlaid_digits(root: str | Path, size: int = 32, n: int = 2000, seed: int = 0) -> Path:
    """Write `n` images of two overlaid digits under `root` (skipped if already there).

    A Multi-MNIST-like set (Sener & Koltun, 2018) from scikit-learn's digits, all ten classes:
    each image overlays two different digit images drawn at random (so their labels are
    independent and may coincide), one shifted to the left and one to the right, both upscaled
    to about two thirds of the canvas and jittered by a few pixels, combined with a pixelwise
    max. Their strokes overlap, so the two tasks, `left` and `right` (labels '0'-'9'),
    compete for the same pixels and features: a standard conflicting multi-task benchmark.

    Writes `root/images/NNNNN.png` (grayscale, `size` px) and `root/manifest.csv` with columns
    `image,left,right`; deterministic given `seed`. Returns `root`.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    if (root / "manifest.csv").is_file():
        return root
    digits = load_digits()
    rng = np.random.default_rng(seed)
    side = max(round(size * 0.65), 8)  # each digit covers about 2/3 of the canvas width
    spare = size - side  # the horizontal room: left digit near 0, right digit near `spare`
    jitter = max(size // 16, 1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        first, second = rng.choice(len(digits.images), size=2, replace=False)
        canvas = np.zeros((size, size), dtype=np.uint8)
        for index, x in ((first, 0), (second, spare)):
            x = int(np.clip(x + rng.integers(-jitter, jitter + 1), 0, spare))
            y = int(rng.integers(max(spare // 2 - jitter, 0), min(spare // 2 + jitter, spare) + 1))
            pixels = (digits.images[index] / 16.0 * 255).astype(np.uint8)
            glyph = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BILINEAR))
            region = canvas[y : y + side, x : x + side]
            np.maximum(region, glyph, out=region)
        path = f"images/{i:05d}.png"
        Image.fromarray(canvas).save(root / path)
        rows.append(
            {
                "image": path,
                "left": str(digits.target[first]),
                "right": str(digits.target[second]),
            }
        )
    tmp = root / "manifest.csv.tmp"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "left", "right"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(root / "manifest.csv")
    return root


def write_examples(root: str = "data/digits") -> None:
    """The example data the shipped recipes read (`python -m transferkit.demo --data-only`)."""
    write_digits(root)
    print(f"wrote {write_few_labels(root)} and the manifests under {root}")
