"""`make demo`: the offline quickstart, end to end on a CPU in a few minutes.

1. write the scikit-learn handwritten digits as PNG files with CSV manifests (data/digits/);
2. pretrain a tiny backbone on digits 0-4 (recipes/digits_source.yaml);
3. transfer it to three tasks on digits 5-9, heads first, then the last groups
   (recipes/digits_transfer.yaml);
4. the same transfer recipe from random weights, at the same budget, for comparison;
5. print a per-task results table.
"""

from __future__ import annotations

import time

from transferkit.digits import write_digits
from transferkit.engine import train
from transferkit.recipes import load_recipe
from transferkit.run_dir import RunDir


def _final_metrics(run_dir) -> dict:
    return RunDir(run_dir).final()


def main(output: str = "runs/demo") -> dict[str, dict]:
    """Run the chain under `output`; returns the last validation metrics of each transfer run."""
    start = time.perf_counter()
    write_digits("data/digits")
    source = train(load_recipe("digits_source"), output=f"{output}/digits_source")
    weights = f"model.weights={source / 'model.safetensors'}"
    transfer = train(
        load_recipe("digits_transfer", [weights]),
        output=f"{output}/digits_transfer",
    )
    scratch = train(
        load_recipe(
            "digits_transfer",
            [
                "model.weights=none",
                "schedule.phases.0.freeze=none",
                "schedule.phases.1.freeze=none",
            ],
        ),
        output=f"{output}/digits_scratch",
    )
    results = {"transfer": _final_metrics(transfer), "scratch": _final_metrics(scratch)}
    keys = [
        k
        for k in results["transfer"]
        if k.startswith("val/") and k.split("/")[-1] in ("accuracy", "f1", "auroc", "mae", "r2")
    ]
    print(
        f"\nDigits 5-9, validation, after {results['transfer']['epoch'] + 1} epochs each ({time.perf_counter() - start:.0f} s in all)"
    )
    print(f"{'metric':28s} {'transfer':>10s} {'scratch':>10s}")
    for key in keys:
        print(f"{key:28s} {results['transfer'][key]:>10.4f} {results['scratch'][key]:>10.4f}")
    print(
        f"\nRun folders: {output}/digits_source, {output}/digits_transfer, {output}/digits_scratch"
    )
    print(
        f"Try: .venv/bin/transferkit predict {output}/digits_transfer data/digits/transfer/images/0005.png"
    )
    return results


if __name__ == "__main__":
    main()
