"""Section (e) of `make bench`, second part: decoded images per second of transferkit's training
loader against timm's `create_loader` on the same images.

Both decode the same PNG files (scikit-learn's digits at the benchmark's size) with the same
transforms (the short side resized to size / crop_pct and center-cropped, to tensor, normalized:
transferkit's `augment: none`, timm's evaluation transform; no augmentation, so the work is
equal), the same batch size and the same number of loader workers, in the same process. Each
loader makes one pass to warm up (worker start, file cache), then the two take `repeats` timed
passes in turn; the median of the per-pair ratios is reported.

- image folder: transferkit's `imagefolder` source against timm's `ImageDataset` over the folder;
- manifest: transferkit's `manifest` source (a CSV of paths and labels) against the same timm
  folder loader (timm reads folders, not manifests);
- shards: the same PNGs in WebDataset tar shards (two per worker), streamed by transferkit
  (`data.source: webdataset`, an epoch of one pass), against timm's loader over the same
  shards (its `wds/` reader, which parses the tars through webdataset as transferkit does).

transferkit's loader is the one a run trains from (`build_run`'s, prepared by Accelerate), so
the per-sample seeding and the label encoding are in its time. timm's runs without its
prefetcher (which would normalize on the device), so both normalize in the workers.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_images(folder: Path, count: int, size: int) -> Path:
    """`count` digits as PNGs in class folders under `folder/train`, and `folder/manifest.csv`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for i in range(count):
        pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB")
        path = folder / "train" / str(digits.target[i]) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        rows.append({"image": str(path.relative_to(folder)), "label": str(digits.target[i])})
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_shards(folder: Path, target: Path, shards: int) -> Path:
    """The images under `folder/train` as `target/train-N.tar` (KEY.png, KEY.cls), dealt
    round-robin, and a validation shard of the first 16."""
    import webdataset

    files = sorted((folder / "train").rglob("*.png"))
    target.mkdir(exist_ok=True)
    groups = {f"train-{n:06d}": files[n::shards] for n in range(shards)}
    for name, chosen in {**groups, "validation-000000": files[:16]}.items():
        with webdataset.TarWriter(str(target / f"{name}.tar")) as tar:
            for file in chosen:
                tar.write({"__key__": file.stem, "png": file.read_bytes(),
                           "cls": file.parent.name.encode()})  # fmt: skip
    return target


def _pass(loader) -> float:
    """Images per second over one pass of `loader`."""
    start, seen = time.perf_counter(), 0
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def _paired_rates(ours, theirs, repeats: int) -> tuple[float, float, float]:
    """(ours, theirs, ratio): one warm-up pass each, then `repeats` timed passes taken in turn,
    so that both see the same moments of a machine whose load drifts; the ratio is the median
    of the per-pair ratios, the rates are medians."""
    _pass(ours), _pass(theirs)
    pairs = [(_pass(ours), _pass(theirs)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(a / b for a, b in pairs))  # fmt: skip


def _transferkit_loader(source: dict, cfg: dict, workers: int, steps: int | None = None):
    from accelerate import Accelerator

    from transferkit.engine.build import build_run
    from transferkit.recipes import parse_recipe

    classes = [str(d) for d in range(10)] if steps else None  # a stream lists its classes
    recipe = parse_recipe({
        "model": {"backbone": cfg["backbone"], "weights": "none"},
        "tasks": {"label": {"kind": "multiclass", "column": "cls" if steps else None,
                            "classes": classes}},
        "data": {**source, "image_size": cfg["size"], "augment": "none", "val_fraction": 0.05,
                 "horizontal_flip": False, "num_workers": workers},
        "train": {"batch_size": cfg["batch"], "epochs": 1, "feature_cache": "forbid",
                  "steps_per_epoch": steps},
    })  # fmt: skip
    return build_run(recipe, Accelerator(cpu=True)).train_loader


def _timm_loader(folder: Path, cfg: dict, workers: int, shards: int = 0):
    """timm's loader over the image folder, or with `shards` over `folder`'s tar shards
    through timm's own WebDataset reader (shuffled as in training, as transferkit's stream is;
    the evaluation transform on both sides)."""
    from timm.data import ImageDataset, create_dataset, create_loader, resolve_data_config

    from transferkit.models import create_backbone

    config = resolve_data_config({}, model=create_backbone(cfg["backbone"], None).model)
    if shards:
        split = f"train-{{000000..{shards - 1:06d}}}.tar|{cfg['loader_images']}"
        dataset = create_dataset("wds/bench", root=str(folder), split=split, is_training=True,
                                 batch_size=cfg["batch"])  # fmt: skip
    else:
        dataset = ImageDataset(str(folder / "train"))
    return create_loader(
        dataset, input_size=(3, cfg["size"], cfg["size"]),
        batch_size=cfg["batch"], is_training=False, use_prefetcher=False,
        interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
        num_workers=workers, crop_pct=config["crop_pct"],
    )  # fmt: skip


def bench_loaders(cfg: dict, workdir: Path, repeats: int = 5) -> dict:
    """Images/s of both loaders, for an image folder and a manifest, and their ratios."""
    from transferkit.data import num_workers

    folder = write_images(workdir / "loader_images", cfg["loader_images"], cfg["size"])
    workers = num_workers(None)
    timm_loader = _timm_loader(folder, cfg, workers)
    sources = {"image folder": {"source": "imagefolder", "path": str(folder)},
               "manifest": {"source": "manifest", "path": str(folder / "manifest.csv"),
                            "val_split": None}}  # fmt: skip
    count = 2 * max(workers, 1)  # shards: two per worker
    shards = write_shards(folder, workdir / "loader_shards", count)
    sources["shards"] = {"source": "webdataset", "path": str(shards)}
    anchors = {"image folder": timm_loader, "manifest": timm_loader,
               "shards": _timm_loader(shards, cfg, workers, shards=count)}  # fmt: skip
    rows = {}
    for name, source in sources.items():
        torch.manual_seed(0)
        steps = cfg["loader_images"] // cfg["batch"] if name == "shards" else None
        ours = _transferkit_loader(source, cfg, workers, steps)
        rate, timm_rate, ratio = _paired_rates(ours, anchors[name], repeats)
        rows[name] = {"transferkit_images_per_s": rate, "timm_images_per_s": timm_rate,
                      "ratio": ratio}  # fmt: skip
    return {"workers": workers, "images": cfg["loader_images"], "size": cfg["size"],
            "rows": rows, "goal": ">= 0.95"}  # fmt: skip
