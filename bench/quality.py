"""`make bench-quality`: does fine-tuning deliver, at few labels, with the shipped defaults?

Writes `bench/results/quality.json` and `bench/results/quality.md` (copied into docs/quality.md).

(a) Label budgets. Handwritten digits 5-9 (scikit-learn's real scans), the `digit` task, with
    K labelled training images per class (K in 5, 10, 20, 50; a different draw for each seed)
    and a fixed validation set of 40 images per class. Methods, each over 3 seeds:
    - `ImageNet LP-FT`: recipes/digits_imagenet.yaml as shipped (EfficientNet-Lite0 with its
      real ImageNet weights, 64 px, 8 epochs of linear probe then 8 with everything unfrozen;
      every other setting is transferkit's default);
    - `ImageNet probe`: the same recipe with one phase, `freeze: all`, for all 16 epochs;
    - `ImageNet full FT`: one phase, `freeze: none`, for all 16 epochs;
    - `scratch`: the same network and 16 epochs from random weights;
    - `hand-written LP-FT`: plain PyTorch at the same epochs (8 + 8): the same network, weights,
      eval transform and data; linear probe on frozen features (AdamW lr 1e-3, wd 0.05,
      batch 16), then every parameter with BatchNorm kept in eval mode (fresh AdamW lr 1e-4,
      batch 16, the last batch kept), a constant rate: what a careful user would write;
    - `digits 0-4 LP-FT`: recipes/digits_transfer.yaml (timm's tiny test_resnet pretrained on
      digits 0-4 by recipes/digits_source.yaml, 32 px), with the budget's data and the default
      batch size.
    The number is the validation digit accuracy after the last epoch (what a user gets).
(b) The digits 0-4 -> 5-9 chain of `make demo` (all three tasks, 200 images): its recipe opts
    out of three engine defaults (batch-norm statistics kept fixed when starting from weights;
    a warmup after each phase change; the fine-tune phase at 0.25 of the rate); against it, each
    default alone and all together, and the one it keeps (a new LR cycle per phase) left out,
    over 3 seeds.

`--quick` runs every method once at toy sizes (used by tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from bench.lpft_by_hand import lpft_by_hand
from bench.quality_tables import budget_table, chain_table, paired_table, unfreeze_table
from transferkit.demo.digits import write_digits
from transferkit.engine import train
from transferkit.recipes import parse_recipe
from transferkit.recipes.io import read_recipe_file
from transferkit.rundir.folder import RunDir

BUDGETS = (5, 10, 20, 50)
SEEDS = (0, 1, 2)
VAL_PER_CLASS = 40
RESULTS = Path(__file__).parent / "results"


def write_budget(root: Path, per_class: int, seed: int) -> Path:
    """A manifest with a fixed validation set (the same for every budget and seed) and
    `per_class` training images per digit drawn, by `seed`, from the remaining images."""
    path = root / "transfer" / f"budget_{per_class}_seed{seed}.csv"
    if path.is_file():
        return path
    frame = pd.read_csv(root / "transfer" / "manifest.csv", dtype=str, keep_default_na=False)
    parts = []
    for _, rows in frame.groupby("digit"):
        rows = rows.sample(frac=1.0, random_state=0)  # the validation draw never changes
        val, rest = rows.iloc[:VAL_PER_CLASS], rows.iloc[VAL_PER_CLASS:]
        picked = rest.sample(n=per_class, random_state=seed)
        parts += [val.assign(split="validation"), picked.assign(split="train")]
    pd.concat(parts).to_csv(path, index=False)
    return path


def _recipe(name: str, manifest: Path, seed: int, changes: dict, epochs: int | None, sets=()):
    data = read_recipe_file(name)
    data["tasks"] = {"digit": data["tasks"]["digit"]}
    data["data"].update(path=str(manifest), val_split="validation", max_samples=None)
    data["seed"] = seed
    for section, values in changes.items():
        data.setdefault(section, {}).update(copy.deepcopy(values))
    if epochs is not None:  # --quick: shrink every phase boundary with the epochs
        scale = epochs / data["train"]["epochs"]
        data["train"]["epochs"] = epochs
        for index, phase in enumerate(data["schedule"]["phases"]):
            phase["from_epoch"] = max(index, int(phase["from_epoch"] * scale))
    return parse_recipe(data, list(sets), source=name)


ONE_PHASE = {
    "probe": {"schedule": {"phases": [{"from_epoch": 0, "freeze": "all"}]}},
    "full": {"schedule": {"phases": [{"from_epoch": 0, "freeze": "none"}]}},
}
RECIPE_METHODS: dict[str, tuple[str, dict]] = {
    "ImageNet LP-FT": ("digits_imagenet", {}),
    "ImageNet probe": ("digits_imagenet", ONE_PHASE["probe"]),
    "ImageNet full FT": ("digits_imagenet", ONE_PHASE["full"]),
    "scratch": ("digits_imagenet", {"model": {"weights": None}, **ONE_PHASE["full"]}),
    "digits 0-4 LP-FT": ("digits_transfer", {"train": {"batch_size": None}}),
}


def hand_written_lpft(manifest: Path, seed: int, epochs: int, size: int, trace=None) -> float:
    """Plain PyTorch LP-FT of the same network; returns the final validation accuracy (and
    appends every epoch's to `trace`, a list, when given)."""
    from transferkit.data.transforms import build_transforms
    from transferkit.models import create_backbone

    torch.manual_seed(seed)
    backbone = create_backbone("timm:tf_efficientnet_lite0", "pretrained")
    model, transform = backbone.model, build_transforms(backbone.data_config, False, "none", size)
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    classes = sorted(frame["digit"].unique())

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = frame[frame["split"] == split]
        images = [transform(Image.open(manifest.parent / p).convert("RGB")) for p in rows["image"]]
        return torch.stack(images), torch.tensor([classes.index(d) for d in rows["digit"]])

    (x_train, y_train), (x_val, y_val) = tensors("train"), tensors("validation")
    model.eval()
    with torch.no_grad():
        f_train = model(x_train)
    head = torch.nn.Linear(f_train.shape[1], len(classes))

    def validate() -> float:
        model.eval()
        with torch.no_grad():
            return float((head(model(x_val)).argmax(1) == y_val).float().mean())

    lpft_by_hand(model, head, f_train, x_train,
                 lambda out, rows: torch.nn.functional.cross_entropy(out, y_train[rows]), epochs,
                 torch.Generator().manual_seed(seed),
                 None if trace is None else lambda: trace.append(validate()))  # fmt: skip
    return validate()


HAND_WRITTEN = "hand-written LP-FT"
PROBE_EPOCHS = 8  # the LP-FT methods: 8 epochs of probe, then 8 of fine-tuning
METHODS = (*RECIPE_METHODS, HAND_WRITTEN)


def label_budgets(
    root: Path,
    work: Path,
    budgets,
    seeds,
    epochs,
    progress: Callable,
    methods=METHODS,
    done=(),
    sets=(),
) -> list:
    """Train every (method, budget, seed) not in `done` (rows of an earlier, interrupted run)."""
    rows = []
    finished = {(r["method"], r["budget"], r["seed"]) for r in done}
    for budget in budgets:
        for seed in seeds:
            manifest = write_budget(root, budget, seed)
            for method in methods:
                if (method, budget, seed) in finished:
                    continue
                start, trace = time.perf_counter(), []
                if method == HAND_WRITTEN:
                    accuracy = hand_written_lpft(manifest, seed, epochs or 16, 64, trace)
                else:
                    name, changes = RECIPE_METHODS[method]
                    if name == "digits_transfer":
                        source = _source_run(root, work, seed, epochs)
                        changes = {**changes, "model": {"weights": str(source)}}
                    recipe = _recipe(name, manifest, seed, changes, epochs, sets)
                    run = train(recipe, output=work / f"{method}_{budget}_{seed}".replace(" ", "_"))
                    accuracy = RunDir(run).final()["val/digit/accuracy"]
                    trace = [r["val/digit/accuracy"] for r in RunDir(run).records()]
                rows.append({**_row(method, budget, seed, accuracy, start), "trace": trace})
                progress(rows[-1])
    return rows


def _row(method: str, budget: int, seed: int, accuracy: float, start: float) -> dict:
    seconds = round(time.perf_counter() - start, 1)
    return {"method": method, "budget": budget, "seed": seed, "accuracy": accuracy, "s": seconds}


def _source_run(root: Path, work: Path, seed: int, epochs: int | None) -> Path:
    """digits_source.yaml at this seed (once): the tiny backbone pretrained on digits 0-4."""
    folder = work / f"digits_source_{seed}"
    if not RunDir(folder).is_complete():
        data = read_recipe_file("digits_source")
        data["data"]["path"] = str(root / "source" / "manifest.csv")
        data["seed"] = seed
        if epochs is not None:
            data["train"]["epochs"] = 1
            data["data"]["max_samples"] = 64
        train(parse_recipe(data, source="digits_source"), output=folder)
    return folder / "model.safetensors"


CHAIN_VARIANTS = {
    "as shipped (opts out of three defaults)": [],
    "statistics fixed (norm_stats: auto, the default)": ["schedule.norm_stats=auto"],
    "phase warmup (phase_warmup_epochs: 3, the default)": ["schedule.phase_warmup_epochs=3"],
    "fine-tune phase at 0.25 of the rate (unfrozen_lr_mult: 0.25, the default)": [
        "schedule.unfrozen_lr_mult=0.25"
    ],
    "every default": [
        "schedule.norm_stats=auto", "schedule.phase_warmup_epochs=3",
        "schedule.unfrozen_lr_mult=0.25",
    ],
    "one LR cycle over the run (lr_cycle: run; the default is a cycle per phase)": [
        "schedule.lr_cycle=run"
    ],
}  # fmt: skip


def digits_chain(root: Path, work: Path, seeds, quick: bool, progress: Callable) -> list:
    rows = []
    for seed in seeds:
        source = _source_run(root, work, seed, 1 if quick else None)
        for variant, overrides in CHAIN_VARIANTS.items():
            data = read_recipe_file("digits_transfer")
            data["data"]["path"] = str(root / "transfer" / "manifest.csv")
            data["model"]["weights"] = str(source)
            data["seed"] = seed
            if quick:
                data["train"]["epochs"], data["data"]["max_samples"] = 2, 32
            recipe = parse_recipe(data, overrides, source="digits_transfer")
            start = time.perf_counter()
            name = f"chain_{seed}_{list(CHAIN_VARIANTS).index(variant)}"
            final = RunDir(train(recipe, output=work / name)).final()
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "digit": final["val/digit/accuracy"],
                    "parity": final["val/parity/accuracy"],
                    "ink_mae": final["val/ink/mae"],
                    "s": round(time.perf_counter() - start, 1),
                }
            )
            progress(rows[-1])
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (for the tests)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--sections", default="a,b", help="which sections to run (a, b)")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="labels per class")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--methods", default=",".join(METHODS), help="section (a)'s methods")
    parser.add_argument(
        "--rows", help="a JSON-lines file: each finished row is appended, and rows already in it "
        "are not run again (resume a long benchmark; the tables cover every row in the file)"
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a recipe override for every recipe method of section (a), to measure a variant",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads (results move with it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = tuple(int(b) for b in args.budgets.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.quick:
        budgets, seeds = (2,), (0,)
    epochs = 2 if args.quick else None
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    report: dict = {"quick": args.quick, "torch_threads": torch.get_num_threads()}
    markdown = []
    with tempfile.TemporaryDirectory() as tmp:
        root, work = write_digits(Path(tmp) / "digits"), Path(tmp) / "runs"
        if "a" in sections:
            methods = [m for m in args.methods.split(",") if m]
            unknown = sorted(set(methods) - set(METHODS))
            if unknown:
                parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
            done = _read_rows(args.rows)
            progress = _print if args.rows is None else _appender(args.rows)
            rows = done + label_budgets(
                root, work, budgets, seeds, epochs, progress, methods, done, args.set
            )
            report["a_budgets"], table = budget_table(rows)
            report["a_runs"] = rows
            markdown += ["## (a) Validation digit accuracy by labels per class", "", table, ""]
            probe_epochs = 1 if args.quick else PROBE_EPOCHS
            markdown += ["## (a) The unfreeze, epoch by epoch", "",
                         unfreeze_table(rows, probe_epochs, ("ImageNet LP-FT", HAND_WRITTEN))]  # fmt: skip
            markdown += ["## (a) LP-FT against the hand-written loop, draw by draw", "",
                         paired_table(rows, "ImageNet LP-FT", HAND_WRITTEN)]  # fmt: skip
        if "b" in sections:
            rows = digits_chain(root, work, seeds, args.quick, _print)
            report["b_chain"], table = chain_table(rows, CHAIN_VARIANTS)
            report["b_runs"] = rows
            markdown += ["## (b) The digits 0-4 -> 5-9 chain (validation)", "", table, ""]
    report["total_s"] = round(time.perf_counter() - started)
    markdown.append(f"Total {report['total_s']} s, torch threads {report['torch_threads']}.")
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    (out / "quality.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
    return report


def _read_rows(path: str | None) -> list:
    if path is None or not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _appender(path: str) -> Callable:
    def progress(row: dict) -> None:
        _print(row)
        with open(path, "a") as file:
            file.write(json.dumps(row) + "\n")

    return progress


def _print(row: dict) -> None:
    print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
