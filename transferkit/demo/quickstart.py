"""`make demo`: the offline quickstart, end to end on a CPU in a few minutes.

1. Real ImageNet weights (EfficientNet-Lite0, shipped in an installed package) fine-tuned on
   handwritten digits 5-9 with 10 labelled images per class, on three tasks (digit, parity,
   ink): LP-FT (`recipes/digits_imagenet.yaml`) against a linear probe and against the same
   network trained from random weights, at the same budget;
2. the source-to-target chain: a tiny backbone pretrained on digits 0-4
   (`recipes/digits_source.yaml`), transferred to digits 5-9 (`recipes/digits_transfer.yaml`);
3. `fit` on the same digits as a folder of class folders, with a 2-minute budget: the plan,
   the trials and the choice, as `transferkit fit FOLDER` makes them;
4. a per-task results table.
"""

from __future__ import annotations

import time

from transferkit.demo.digits import write_class_folders, write_digits, write_few_labels
from transferkit.engine import train
from transferkit.recipes import load_recipe
from transferkit.rundir import RunDir

PROBE_ONLY = "schedule.phases=[{from_epoch: 0, freeze: all}]"
SCRATCH = ["model.weights=none", "schedule.phases=[{from_epoch: 0, freeze: none}]"]
SHOWN = ("accuracy", "f1", "mae", "r2")


def _final(run_dir) -> dict:
    return RunDir(run_dir).final()


def _table(columns: dict[str, dict]) -> str:
    names = list(columns)
    first = columns[names[0]]
    keys = [k for k in first if k.startswith("val/") and k.rsplit("/", 1)[-1] in SHOWN]
    lines = [f"{'metric':24s} " + " ".join(f"{n:>12s}" for n in names)]
    for key in keys:
        lines.append(f"{key:24s} " + " ".join(f"{columns[n][key]:>12.4f}" for n in names))
    return "\n".join(lines)


def digits_chain(output: str = "runs/demo") -> dict:
    """The second example alone (two tiny runs, about a minute): digits 0-4, then 5-9."""
    write_digits("data/digits")
    source = train(load_recipe("digits_source"), output=f"{output}/digits_source")
    weights = f"model.weights={source / 'model.safetensors'}"
    transfer = train(load_recipe("digits_transfer", [weights]), output=f"{output}/digits_transfer")
    return _final(transfer)


def _fit_folder(output: str = "runs/demo", minutes: float = 2.0):
    """The third example: `transferkit fit data/digits/transfer/folders --time-budget 2
    --set data.horizontal_flip=false` (digits must not be mirrored)."""
    from transferkit.select import fit

    tree = write_class_folders("data/digits")
    print(f"\n3. fit {tree} --time-budget {minutes:g}")
    return fit(tree, f"{output}/fit", overwrite=True, time_budget=minutes,
               overrides=["data.horizontal_flip=false"])  # fmt: skip


def main(output: str = "runs/demo") -> dict[str, dict]:
    """Run both examples under `output`; returns the last validation metrics of each run."""
    start = time.perf_counter()
    write_digits("data/digits")
    write_few_labels("data/digits")
    imagenet = {
        "LP-FT": train(load_recipe("digits_imagenet"), output=f"{output}/imagenet_lpft"),
        "probe": train(load_recipe("digits_imagenet", [PROBE_ONLY]), output=f"{output}/imagenet_probe"),
        "scratch": train(load_recipe("digits_imagenet", SCRATCH), output=f"{output}/imagenet_scratch"),
    }  # fmt: skip
    middle = time.perf_counter()
    results = {name: _final(path) for name, path in imagenet.items()}
    results["digits 0-4 -> 5-9"] = digits_chain(output)
    print(
        "\n1. ImageNet EfficientNet-Lite0 -> digits 5-9, 10 labels per class, validation after "
        f"{results['LP-FT']['epoch'] + 1} epochs each ({middle - start:.0f} s)"
    )
    print(_table({k: results[k] for k in ("LP-FT", "probe", "scratch")}))
    print(
        "\n2. A tiny backbone pretrained on digits 0-4, transferred to digits 5-9 "
        f"({time.perf_counter() - middle:.0f} s)"
    )
    print(_table({"transfer": results["digits 0-4 -> 5-9"]}))
    fitted = _fit_folder(output)
    results["fit"] = _final(fitted.run_dir.path)
    print(f"\nTotal {time.perf_counter() - start:.0f} s. Run folders under {output}/")
    print(
        f"Try: .venv/bin/transferkit predict {output}/imagenet_lpft data/digits/transfer/images/0005.png"
    )
    return results
