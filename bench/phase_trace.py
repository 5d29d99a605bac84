"""Validation accuracy epoch by epoch around the unfreeze of LP-FT (issue 13, item 3).

`make bench-quality` reports where runs end; this shows the way there: the probe's last epoch,
the first fine-tune epoch (does it collapse?), the worst fine-tune epoch and the last, for
  - `defaults`: recipes/digits_imagenet.yaml as shipped (ImageNet EfficientNet-Lite0, 64 px,
    8 probe + 8 fine-tune epochs, every other value transferkit's default);
  - `fine-tune phase at 0.2`: the same with the heads and the unfrozen groups at 0.2 of the
    rate in the fine-tune phase (`schedule.unfrozen_lr_mult: 0.2`, phase lr_mult heads 0.2);
  - `hand-written`: bench.quality's plain PyTorch LP-FT (constant 1e-4 after the probe).
Same data draws as bench.quality (K labels per class, 40 per class to validate).

    .venv/bin/python -m bench.phase_trace --budgets 10 --seeds 0,1,2,3,4

Writes bench/results/phase_trace.json and .md; `--quick` runs toy sizes (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.quality import RESULTS, _recipe, _summary, hand_written_lpft, write_budget
from transferkit.digits import write_digits
from transferkit.engine import train
from transferkit.run_dir import RunDir

PROBE_EPOCHS = 8
VARIANTS = {
    "defaults": [],
    "fine-tune phase at 0.2": [
        "schedule.unfrozen_lr_mult=0.2",
        "schedule.phases.1.lr_mult={heads: 0.2}",
    ],
}
HAND_WRITTEN = "hand-written"


def trace(root: Path, work: Path, method: str, budget: int, seed: int, quick: bool) -> list:
    """Validation digit accuracy after every epoch."""
    manifest = write_budget(root, budget, seed)
    epochs = 4 if quick else 2 * PROBE_EPOCHS
    if method == HAND_WRITTEN:
        accuracies: list[float] = []
        hand_written_lpft(manifest, seed, epochs, size=32 if quick else 64, trace=accuracies)
        return accuracies
    sets = [*VARIANTS[method], *(["data.image_size=32"] if quick else [])]
    recipe = _recipe("digits_imagenet", manifest, seed, {}, epochs if quick else None, sets)
    run = train(recipe, output=work / f"{method}_{budget}_{seed}".replace(" ", "_"))
    return [r["val/digit/accuracy"] for r in RunDir(run).history().to_dict("records")]


def summarize(rows: list[dict], probe_epochs: int) -> str:
    """A markdown table: per method and budget, mean ± std over seeds of the four moments."""

    def cell(values: list[float]) -> str:
        summary = _summary(values)
        return f"{summary['mean']:.3f} ± {summary['std']:.3f}"

    lines = [
        "| method | labels/class | seeds | end of probe | 1st fine-tune epoch | worst fine-tune "
        "epoch | final | runs losing > 5 points in the 1st fine-tune epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["method"], row["budget"]), []).append(row["accuracy"])
    for (method, budget), traces in groups.items():
        probe = [t[probe_epochs - 1] for t in traces]
        first = [t[probe_epochs] for t in traces]
        worst = [min(t[probe_epochs:]) for t in traces]
        drops = sum(p - f > 0.05 for p, f in zip(probe, first))
        lines.append(
            f"| {method} | {budget} | {len(traces)} | {cell(probe)} | {cell(first)} | "
            f"{cell(worst)} | {cell([t[-1] for t in traces])} | {drops} of {len(traces)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budgets", default="10")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root, work = write_digits(Path(tmp) / "digits"), Path(tmp) / "runs"
        for budget in budgets:
            for seed in seeds:
                for method in [*VARIANTS, HAND_WRITTEN]:
                    accuracy = trace(root, work, method, budget, seed, args.quick)
                    rows.append({"method": method, "budget": budget, "seed": seed,
                                 "accuracy": accuracy})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "phase_trace.json").write_text(json.dumps(rows, indent=1))
    probe_epochs = 2 if args.quick else PROBE_EPOCHS
    (out / "phase_trace.md").write_text(summarize(rows, probe_epochs))
    return rows


if __name__ == "__main__":
    main()
