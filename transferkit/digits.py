"""Offline example data: the real handwritten digits that scikit-learn ships, as PNG files.

`write_digits(root)` writes two image sets with CSV manifests:
- `source/`: digits 0-4, one task (`digit`), for pretraining a small backbone;
- `transfer/`: digits 5-9, three tasks: `digit` (5-9), `parity` (even/odd) and `ink` (how much
  of the image is ink, standardized: a regression target), with a fifth of the parity and ink
  labels missing, as in real multi-task data.
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


if __name__ == "__main__":
    import sys

    print(write_digits(sys.argv[1] if len(sys.argv) > 1 else "data/digits"))
