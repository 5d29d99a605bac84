"""The `transferkit` command line. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys

from transferkit.errors import UserError


def _inspect(args: argparse.Namespace) -> int:
    from transferkit.models import create_backbone

    # Without weights the structure is all we need: build on the meta device (no memory, instant).
    device = "meta" if args.weights in (None, "none", "random") else None
    backbone = create_backbone(args.backbone, weights=args.weights, device=device)
    backbone.freeze(args.freeze)
    groups = backbone.group_summary()
    total = sum(g["params"] for g in groups)
    trainable = sum(g["trainable_params"] for g in groups)
    if args.json:
        report = {
            "backbone": backbone.name,
            "weights": args.weights,
            "freeze": str(backbone.freeze_spec),
            "num_features": backbone.num_features,
            "data_config": backbone.data_config.to_dict(),
            "total_params": total,
            "trainable_params": trainable,
            "groups": groups,
            "load_report": str(backbone.load_report) if backbone.load_report else None,
        }
        print(json.dumps(report, indent=2))
        return 0
    dc = backbone.data_config
    print(f"{backbone.name}   features: {backbone.num_features}   freeze: {backbone.freeze_spec}")
    if backbone.load_report:
        print(f"weights: {backbone.load_report}")
    print(
        f"preprocessing: input {'x'.join(map(str, dc.input_size))}, mean {_fmt(dc.mean)}, std {_fmt(dc.std)}, "
        f"{dc.interpolation}, crop_pct {dc.crop_pct} ({dc.crop_mode})"
    )
    width = max(len(g["name"]) for g in groups)
    print(f"\n {'#':>3}  {'group':<{width}}  {'params':>12}  trainable")
    for i, g in enumerate(groups):
        mark = (
            "yes"
            if g["trainable_params"] == g["params"] and g["params"]
            else ("partly" if g["trainable"] else "no")
        )
        if g["trainable"] and g["trainable_params"] < g["params"]:
            mark = f"partly ({g['trainable_params']:,})"
        print(f" {i:>3}  {g['name']:<{width}}  {g['params']:>12,}  {mark}")
    print(
        f"\n total {total:,} parameters, {trainable:,} trainable ({100 * trainable / max(total, 1):.1f}%)"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from transferkit.engine import train
    from transferkit.recipes import load_recipe
    from transferkit.run_dir import RunDir

    # --resume alone continues with the run's own resolved recipe.
    if args.resume and not args.recipe:
        recipe = RunDir(args.resume).recipe(args.set or [])
    elif args.recipe:
        recipe = load_recipe(args.recipe, args.set or [])
    else:
        raise UserError("train needs a RECIPE (or --resume RUN_DIR)")
    run_dir = train(recipe, output=args.output, resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from transferkit.engine.evaluate import evaluate_run

    values = evaluate_run(
        args.run_dir, split=args.split, data=args.data, device=args.device,
        batch_size=args.batch_size,
    )  # fmt: skip
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        for key, value in values.items():
            print(f"{key:40s} {value:.4f}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from transferkit.inference import load

    run = load(args.run_dir)
    results = run.predict_named(args.images, device=args.device, batch_size=args.batch_size or 64)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for row in results:
            tasks = "  ".join(f"{k}={_short(v)}" for k, v in row.items() if k != "image")
            print(f"{row['image']}  {tasks}")
    return 0


def _short(value: dict) -> str:
    if "label" in value:
        return f"{value['label']} ({value['score']:.2f})"
    if "value" in value:
        return str(value["value"])
    return ",".join(map(str, value.get("labels", [])))


def _lr_find(args: argparse.Namespace) -> int:
    from transferkit.lr_find import lr_find
    from transferkit.recipes import load_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    result, path = lr_find(recipe, args.phase, args.steps, args.output, args.min_lr, args.max_lr)
    print(
        f"phase {result.phase}: suggested train.lr {result.suggestion:.3g} "
        f"({len(result.lrs)} steps from {result.lrs[0]:.1e} to {result.lrs[-1]:.1e}); plot: {path}"
    )
    print(f"use it with: --set train.lr={result.suggestion:.3g}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from transferkit.sweep import parse_grid, sweep

    root = sweep(args.recipe, parse_grid(args.grid), args.output, args.set or [])
    print(f"sweep folder: {root} (report.md, report.csv, report_*.png)")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transferkit import ensemble

    if args.predict:
        from transferkit.data import decode_prediction_inputs

        inputs = decode_prediction_inputs(args.predict)
        results = [
            {"image": name, **p}
            for (name, _), p in zip(
                inputs, ensemble.predict_ensemble(args.runs, [i for _, i in inputs])
            )
        ]
        print(
            json.dumps(results, indent=2)
            if args.json
            else "\n".join(
                f"{r['image']}  "
                + "  ".join(f"{k}={_short(v)}" for k, v in r.items() if k != "image")
                for r in results
            )
        )
        return 0
    results = ensemble.evaluate_ensemble(args.runs, args.split, args.data, args.soup)
    if args.output:
        ensemble.write_report(results, Path(args.output))
    print(json.dumps(results, indent=2) if args.json else ensemble.report(results))
    return 0


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch (default: 64, or the recipe's)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="transferkit", description="Transfer learning for timm and torchvision backbones."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser(
        "inspect",
        help="show a backbone's layer groups, what a freeze spec trains, and its preprocessing",
    )
    inspect.add_argument("backbone", help="SOURCE:NAME, e.g. timm:resnet18 or torchvision:resnet50")
    inspect.add_argument(
        "--weights", default=None, help="none (default), pretrained, or a local file"
    )
    inspect.add_argument(
        "--freeze",
        default="none",
        help="freeze spec, e.g. all, up_to:layer3, train:layer4, regex:PATTERN",
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=_inspect)

    train = sub.add_parser("train", help="fine-tune as a YAML recipe says")
    train.add_argument(
        "recipe",
        nargs="?",
        help="a recipe YAML, or a shipped recipe's name such as digits_transfer "
        "(optional with --resume: the run's own recipe)",
    )
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override a recipe value (repeatable)",
    )
    train.add_argument("--output", help="the run folder (default: OUTPUT_DIR/NAME from the recipe)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its newest complete checkpoint"
    )
    train.set_defaults(func=_train)

    finder = sub.add_parser(
        "lr-find", help="a learning-rate range test for one phase; plots loss against train.lr"
    )
    finder.add_argument("recipe", help="a recipe YAML or a shipped recipe's name")
    finder.add_argument(
        "--phase", type=int, default=-1, help="index into schedule.phases (default: the last)"
    )
    finder.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    finder.add_argument("--min-lr", type=float, default=1e-7)
    finder.add_argument("--max-lr", type=float, default=1.0)
    finder.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")
    finder.add_argument("--output", help="the plot (default lr_find_<recipe>_phase<N>.png)")
    finder.set_defaults(func=_lr_find)

    sweep = sub.add_parser("sweep", help="train every combination of a grid and report the results")
    sweep.add_argument("recipe")
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a recipe key and its values (repeatable)",
    )
    sweep.add_argument(
        "--set", action="append", metavar="KEY.PATH=VALUE", help="a fixed override for every run"
    )
    sweep.add_argument("--output", help="the sweep folder (default: OUTPUT_DIR/NAME_sweep)")
    sweep.set_defaults(func=_sweep)

    ens = sub.add_parser(
        "ensemble",
        help="average the predictions of runs with the same tasks (and their weights: --soup)",
    )
    ens.add_argument("runs", nargs="+", metavar="RUN_DIR")
    mode = ens.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--eval", action="store_true", help="compare each member with the ensemble on a split"
    )
    mode.add_argument(
        "--predict", nargs="+", metavar="IMAGE_OR_FOLDER", help="predict with the ensemble"
    )
    ens.add_argument("--split", default="validation")
    ens.add_argument("--data", help="other data with the same columns")
    ens.add_argument(
        "--soup", action="store_true", help="also evaluate the average of the members' weights"
    )
    ens.add_argument("--output", help="folder for ensemble_report.md and .json")
    ens.add_argument("--json", action="store_true")
    ens.set_defaults(func=_ensemble)

    evaluate = sub.add_parser(
        "eval", help="per-task metrics of a run's model on a split or other data"
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "--split", default="validation", help="split of the run's data (default: validation)"
    )
    evaluate.add_argument(
        "--data", help="another data source: a manifest file, image folder or saved dataset"
    )
    evaluate.add_argument("--json", action="store_true")
    _device_options(evaluate)
    evaluate.set_defaults(func=_eval)

    predict = sub.add_parser("predict", help="predict every task for images or folders of images")
    predict.add_argument("run_dir")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--json", action="store_true")
    _device_options(predict)
    predict.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `transferkit` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"transferkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
