"""`make bench-end-to-end`: a whole run's wall time, transferkit's CLI against timm's train.py.

Both train `tf_efficientnet_lite0` from random weights (no hub on this machine) for 16 epochs of
full fine-tuning on 48 handwritten digits at 64 px (3 batches of 16, so timm's `drop_last`
changes nothing), validate on 48 others after every epoch, save a checkpoint every epoch, with
one torch thread, no data-loader workers and no augmentation. Each is its own process, timed
from launch to exit, alternated over `--repeats`.

The anchor is timm's `train.py` from the timm checkout given with `--timm-train PATH` (or
$TIMM_TRAIN); without one, a hand-written loop with the same steps (timm's model and AdamW,
torchvision's ImageFolder, a validation pass and `torch.save` every epoch), labelled as such.

A second transferkit run in one process times its parts (imports, data and model set-up, the
steps, validation, checkpoints, the end-of-run files), so that the difference can be read.
Writes `end_to_end.json` and `.md` under `--out` (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EPOCHS, BATCH, SIZE, IMAGES = 16, 16, 64, 48
RECIPE = f"""
name: end_to_end
seed: 0
model: {{backbone: "timm:tf_efficientnet_lite0", weights: none}}
tasks: {{label: {{kind: multiclass}}}}
data: {{source: imagefolder, path: data, image_size: {SIZE}, augment: none, horizontal_flip: false,
       num_workers: 0}}
schedule: {{phases: [{{from_epoch: 0, freeze: none}}]}}
train: {{epochs: @EPOCHS@, batch_size: {BATCH}, lr: 0.001, weight_decay: 0.05, warmup_epochs: 0,
        feature_cache: forbid, keep_checkpoints: 1}}
"""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The parts of a run, timed in one process by wrapping the trainer's calls.
_PARTS = """
import collections, json, sys, time
T0 = time.perf_counter()
import torch
torch.set_num_threads(1)
import transferkit.engine.loop as L
import transferkit.engine.trainer as T
from transferkit.recipes import load_recipe
spent = collections.defaultdict(float)
spent["imports (torch, timm, accelerate, datasets, transferkit)"] = time.perf_counter() - T0
def timed(owner, name, part):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - start
    setattr(owner, name, wrapper)
timed(T, "build_run", "set-up: data, model, optimizer")
timed(L.TrainLoop, "epoch", "training steps (data loading included)")
timed(T, "evaluate", "validation and its metrics (the first imports torchmetrics)")
timed(T, "save_checkpoint", "checkpoints")
for name in ("save_model", "write_card", "_draw_curves", "start_trackers", "_record_start"):
    timed(T, name, "run folder: model, card, curves.png, records")
start = time.perf_counter()
T.train(load_recipe("recipe.yaml"), output="runs/parts", overwrite=True)
spent["other (inside train)"] = time.perf_counter() - start - sum(
    v for k, v in spent.items() if not k.startswith("imports"))
print(json.dumps(spent), file=sys.stderr)
"""

# Without a timm checkout: train.py's work, written by hand.
_HANDWRITTEN = f"""
import timm, timm.optim, torch, torch.nn.functional as F
from torchvision import datasets, transforms
torch.set_num_threads(1)
torch.manual_seed(0)
tf = transforms.Compose([transforms.Resize({SIZE}), transforms.ToTensor(),
                         transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
train = torch.utils.data.DataLoader(datasets.ImageFolder("data/train", tf), batch_size={BATCH},
                                    shuffle=True, drop_last=True)
val = torch.utils.data.DataLoader(datasets.ImageFolder("data/validation", tf), batch_size={BATCH})
model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
for epoch in range(@EPOCHS@):
    model.train()
    for images, labels in train:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val)
    torch.save({{"model": model.state_dict(), "optimizer": optimizer.state_dict()}}, "last.pth")
"""


def write_digits(folder: Path) -> None:
    """48 training and 48 validation digits (scikit-learn's scans) as class folders."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, rows in (("train", range(IMAGES)), ("validation", range(IMAGES, 2 * IMAGES))):
        for i in rows:
            pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
            image = Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
            target = folder / split / str(digits.target[i])
            target.mkdir(parents=True, exist_ok=True)
            image.save(target / f"{i:04d}.png")


def _timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **ONE_THREAD}, timeout=1800)  # fmt: skip
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{command[1][:60]} failed: {result.stderr[-2000:]}")
    return seconds


def _anchor_command(timm_train: str | None, epochs: int) -> tuple[str, list[str]]:
    if not timm_train:
        code = _HANDWRITTEN.replace("@EPOCHS@", str(epochs))
        return "a hand-written timm loop (no timm checkout given)", [sys.executable, "-c", code]
    script = Path(timm_train)
    script = script / "train.py" if script.is_dir() else script
    if not script.is_file():
        raise SystemExit(f"--timm-train {timm_train}: no train.py there (a timm checkout)")
    return "timm's train.py", [
        sys.executable, str(script), "--data-dir", "data", "--train-split", "train",
        "--val-split", "validation", "--model", "tf_efficientnet_lite0", "--num-classes", "10",
        "--input-size", "3", str(SIZE), str(SIZE), "--crop-pct", "1.0", "-b", str(BATCH),
        "--epochs", str(epochs), "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05",
        "--warmup-epochs", "0", "--no-aug", "--smoothing", "0", "--workers", "0", "--seed", "0",
        "--device", "cpu", "--output", "timm_output", "--checkpoint-hist", "1",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", default=os.environ.get("TIMM_TRAIN"), metavar="PATH")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="fewer for a quick check")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    anchor, anchor_command = _anchor_command(args.timm_train, args.epochs)
    cli = [sys.executable, "-m", "transferkit.cli", "train", "recipe.yaml", "--output",
           "runs/whole", "--overwrite"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_digits(work / "data")
        (work / "recipe.yaml").write_text(RECIPE.replace("@EPOCHS@", str(args.epochs)))
        ours, theirs = [], []
        for repeat in range(args.repeats):
            ours.append(_timed(cli, work))
            theirs.append(_timed(anchor_command, work))
            print(f"repeat {repeat}: transferkit {ours[-1]:.1f} s, {anchor} {theirs[-1]:.1f} s")
        parts = subprocess.run([sys.executable, "-c", _PARTS], cwd=work, capture_output=True,
                               text=True, env={**os.environ, **ONE_THREAD}, timeout=1800)  # fmt: skip
        breakdown = json.loads(parts.stderr.strip().splitlines()[-1])
    results = {
        "setup": f"tf_efficientnet_lite0 from random weights, {args.epochs} epochs, {IMAGES} train + "
        f"{IMAGES} validation digits at {SIZE} px, batch {BATCH}, 1 thread, no workers",
        "anchor": anchor, "transferkit_s": ours, "anchor_s": theirs,
        "ratio": statistics.median(ours) / statistics.median(theirs),
        "transferkit_parts_s": breakdown,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "end_to_end.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "end_to_end.md").write_text(_markdown(results))
    print(_markdown(results))
    return results


def _markdown(r: dict) -> str:
    lines = [f"{r['setup']}; each a process timed from launch to exit, median of "
             f"{len(r['transferkit_s'])}.", "",
             "| run | wall s (each) | median |", "|---|---|---|",
             f"| transferkit train (CLI) | {', '.join(f'{s:.1f}' for s in r['transferkit_s'])} | "
             f"{statistics.median(r['transferkit_s']):.1f} |",
             f"| {r['anchor']} | {', '.join(f'{s:.1f}' for s in r['anchor_s'])} | "
             f"{statistics.median(r['anchor_s']):.1f} |", "",
             f"Ratio transferkit / anchor: **{r['ratio']:.2f}** (goal: at most 1.00).", "",
             "Where transferkit's time goes (one in-process run):", "",
             "| part | s |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.2f} |" for k, v in r["transferkit_parts_s"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
