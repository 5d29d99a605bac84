"""Does `transferkit rank` predict what fine-tuning reaches? (`python -m bench.rank_validation`)

On the digits 5-9 with 10 labelled images per class (`digits_imagenet`: 50 training images,
200 to validate, 64 px, tasks digit / parity / ink), each candidate backbone is
1. scored by `transferkit.select.transferability.rank` (LogME and kNN on the 50 training images), then
2. fine-tuned with the recipe's LP-FT (8 epochs linear probe, 8 epochs full fine-tuning),
and the rank correlations (Spearman, Kendall) between the scores and the best validation
accuracy reached are reported. Candidates: EfficientNet-Lite0 with its real ImageNet weights
and with random ones, timm's test ResNet pretrained on digits 0-4 for 8 epochs and for 1 epoch
and with random weights, and timm's test EfficientNet with random weights.

A second check ranks the layer groups of the ImageNet Lite0 against the accuracy of a logistic
regression probe on each group's pooled features (train -> validation), and a third records
the WiSE-FT curve (`transferkit.interpolate`) of the first candidate's LP-FT run (the ImageNet
Lite0).

Writes `rank_validation.json` and `rank_validation.md` into `--out` (default bench/results).
`--quick`: toy sizes and three random or briefly pretrained test models (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LITE0 = "timm:tf_efficientnet_lite0"
TASKS = ("digit", "parity")  # the classification tasks correlated (ink is a regression)
QUICK = ["data.image_size=32", "train.epochs=2",
         "schedule.phases=[{from_epoch: 0, freeze: all}, {from_epoch: 1, freeze: none}]"]  # fmt: skip
ALPHAS = [round(0.1 * i, 1) for i in range(11)]


def candidates(quick: bool) -> list[tuple[str, str, str]]:
    """(label, backbone, weights); weights `source:N` is the digits 0-4 run of N epochs."""
    if quick:
        return [("test_resnet digits 0-4, 1 ep", "timm:test_resnet", "source:1"),
                ("test_resnet random", "timm:test_resnet", "none"),
                ("test_efficientnet random", "timm:test_efficientnet", "none")]  # fmt: skip
    return [("lite0 ImageNet", LITE0, "pretrained"), ("lite0 random", LITE0, "none"),
            ("test_resnet digits 0-4, 8 ep", "timm:test_resnet", "source:8"),
            ("test_resnet digits 0-4, 1 ep", "timm:test_resnet", "source:1"),
            ("test_resnet random", "timm:test_resnet", "none"),
            ("test_efficientnet random", "timm:test_efficientnet", "none")]  # fmt: skip


def correlations(scores: list[float], reached: list[float]) -> dict[str, float]:
    from scipy.stats import kendalltau, spearmanr

    if len(set(reached)) < 2 or len(set(scores)) < 2:  # a constant side: no ranking to compare
        return {"spearman": None, "spearman_p": None, "kendall": None, "kendall_p": None,
                "n": len(scores)}  # fmt: skip
    rho, rho_p = spearmanr(scores, reached)
    tau, tau_p = kendalltau(scores, reached)
    values = {"spearman": rho, "spearman_p": rho_p, "kendall": tau, "kendall_p": tau_p}
    return {**{k: None if math.isnan(v) else float(v) for k, v in values.items()}, "n": len(scores)}


def source_runs(epochs: set[int], data: Path, work: Path, quick: bool) -> dict[int, Path]:
    """The digits 0-4 pretraining runs (timm:test_resnet from scratch) the candidates use."""
    from transferkit.engine import train
    from transferkit.recipes import load_recipe

    runs = {}
    for n in sorted(epochs):
        overrides = [f"data.path={data}/source/manifest.csv", f"train.epochs={n}"]
        overrides += ["data.max_samples=64"] if quick else []
        runs[n] = train(load_recipe("digits_source", overrides), output=str(work / f"source_{n}"))
    return runs


def probe_cuts(recipe, backbone_spec: str, weights: str) -> dict[str, float]:
    """Validation accuracy (digit) of a logistic regression on each group's pooled features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from transferkit.data import TaskImageDataset, build_transforms, load_data
    from transferkit.models import create_backbone
    from transferkit.select.transferability import feature_pass

    data = load_data(recipe.data, recipe.tasks, recipe.seed)
    backbone = create_backbone(backbone_spec, weights)
    transform = build_transforms(backbone.data_config, False, "none", recipe.data.image_size)
    passes = {}
    for split in ("train", "validation"):
        dataset = TaskImageDataset(data.splits[split], data.tasks, transform)
        passes[split] = feature_pass(backbone, dataset, backbone.group_names, 64, "cpu", 0)
    accuracy = {}
    for group in passes["train"][0]:
        xy = []
        for split in ("train", "validation"):
            features, targets, masks = passes[split]
            keep = masks["digit"].bool()
            xy.append((features[group][keep].numpy(), targets["digit"][keep].numpy()))
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(*xy[0])
        accuracy[group] = float(probe.score(*xy[1]))
    return accuracy


def main(argv: list[str] | None = None) -> dict:
    from transferkit.demo.digits import write_digits, write_few_labels
    from transferkit.engine import train
    from transferkit.recipes import load_recipe
    from transferkit.rundir.folder import RunDir
    from transferkit.runs.wise_ft import interpolate
    from transferkit.select.transferability import OUTPUT, parse_candidate, rank

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (for the tests)")
    parser.add_argument("--out", default=str(HERE / "results"), help="where results go")
    parser.add_argument("--data", default="data/digits", help="the digits (written if missing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = Path(args.data).resolve()
    write_digits(data)
    write_few_labels(data)
    base = [f"data.path={data}/transfer/few_10.csv", *(QUICK if args.quick else [])]
    work = Path(tempfile.mkdtemp(prefix="rank_validation_"))
    start = time.perf_counter()
    try:
        chosen = candidates(args.quick)
        sources = source_runs({int(w.split(":")[1]) for _, _, w in chosen if w.startswith("source:")},
                              data, work, args.quick)  # fmt: skip
        weights = {w: str(sources[int(w.split(":")[1])]) if w.startswith("source:") else w
                   for _, _, w in chosen}  # fmt: skip
        recipe = load_recipe("digits_imagenet", base)
        specs = [f"{b}@{weights[w]}" for _, b, w in chosen]
        scored = {r.candidate: r for r in rank(recipe, specs, progress=False) if r.group == OUTPUT}
        rows = []
        for (label, backbone, w), spec in zip(chosen, specs):
            overrides = [*base, f"model.backbone={backbone}", f"model.weights={weights[w]}"]
            began = time.perf_counter()
            run = train(
                load_recipe("digits_imagenet", overrides),
                output=str(work / label.replace(" ", "_")),
            )
            best = RunDir(run).best()
            row = {"candidate": label, "spec": spec.replace(str(work), "<tmp>"),
                   "scores": scored[parse_candidate(spec).label].scores,
                   "reached": {t: best[f"val/{t}/accuracy"] for t in TASKS},
                   "lpft_seconds": time.perf_counter() - began}  # fmt: skip
            if not rows:  # the first candidate has pretrained weights: its WiSE-FT curve
                curve = interpolate(run, [0, 0.5, 1] if args.quick else ALPHAS, device="cpu")
                row["wise_ft"] = {"alphas": curve.alphas, "monitor": curve.monitor,
                                  "values": curve.values, "best_alpha": curve.best_alpha}  # fmt: skip
            rows.append(row)
        result = {"quick": args.quick, "candidates": rows, "correlations": {}}
        for task in TASKS:
            reached = [r["reached"][task] for r in rows]
            for score in ("logme", "knn"):
                values = [r["scores"][task][score] for r in rows]
                result["correlations"][f"{task}/{score}"] = correlations(values, reached)
        cut_spec, cut_weights = (
            (LITE0, "pretrained") if not args.quick else ("timm:test_resnet", weights["source:1"])
        )
        cut_scores = rank(recipe, [f"{cut_spec}@{cut_weights}"], ["all"], progress=False)
        probes = probe_cuts(recipe, cut_spec, cut_weights)
        cuts = [{"group": r.group, "dim": r.dim, "logme": r.scores["digit"]["logme"],
                 "knn": r.scores["digit"]["knn"], "probe": probes[r.group]} for r in cut_scores]  # fmt: skip
        result["cuts"] = {"backbone": f"{cut_spec}@{'pretrained' if not args.quick else 'source:1'}",
                          "rows": cuts,
                          **{f"digit/{s}": correlations([c[s] for c in cuts], [c["probe"] for c in cuts])
                             for s in ("logme", "knn")}}  # fmt: skip
        result["seconds"] = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_validation.json").write_text(json.dumps(result, indent=2))
    (out / "rank_validation.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _pair(c: dict, key: str) -> str:
    value, p = c[key], c[f"{key}_p"]
    return "undefined (a constant side)" if value is None else f"{value:.2f} (p {p:.2f})"


def markdown(result: dict) -> str:
    lines = ["| candidate | digit LogME | digit kNN | parity LogME | parity kNN | "
             "LP-FT digit acc | LP-FT parity acc |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(result["candidates"], key=lambda r: -r["scores"]["digit"]["logme"]):
        s, a = r["scores"], r["reached"]
        lines.append(f"| {r['candidate']} | {s['digit']['logme']:.3f} | {s['digit']['knn']:.3f} | "
                     f"{s['parity']['logme']:.3f} | {s['parity']['knn']:.3f} | {a['digit']:.3f} | "
                     f"{a['parity']:.3f} |")  # fmt: skip
    lines += [
        "",
        "| score vs LP-FT accuracy | Spearman | Kendall | n |",
        "|---|---|---|---|",
    ]
    for key, c in result["correlations"].items():
        lines.append(f"| {key} | {_pair(c, 'spearman')} | {_pair(c, 'kendall')} | {c['n']} |")
    cuts = result["cuts"]
    lines += ["", f"Layer groups of {cuts['backbone']}: digit scores vs a logistic-regression "
              "probe's validation accuracy", "", "| group | dim | LogME | kNN | probe acc |",
              "|---|---|---|---|---|"]  # fmt: skip
    for c in cuts["rows"]:
        lines.append(
            f"| {c['group']} | {c['dim']} | {c['logme']:.3f} | {c['knn']:.3f} | {c['probe']:.3f} |"
        )
    for s in ("logme", "knn"):
        c = cuts[f"digit/{s}"]
        lines.append(f"\n{s} vs probe: Spearman {_pair(c, 'spearman')}, "
                     f"Kendall {_pair(c, 'kendall')}, n {c['n']}")  # fmt: skip
    first = result["candidates"][0]
    wise = first["wise_ft"]
    lines += ["", f"WiSE-FT of the {first['candidate']} LP-FT run ({wise['monitor']}):", "",
              "| alpha | " + " | ".join(f"{a:g}" for a in wise["alphas"]) + " |",
              "|---" * (len(wise["alphas"]) + 1) + "|",
              "| acc | " + " | ".join(f"{v:.3f}" for v in wise["values"]) + " |"]  # fmt: skip
    lines.append(f"\n{result['seconds']:.0f} s on {torch.get_num_threads()} CPU thread(s).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
