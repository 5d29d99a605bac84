"""`transferkit eval`, `predict` and `ensemble`: commands that use finished runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transferkit.cli.common import (
    ENGINE,
    ENGINE_AND_METRICS,
    device_options,
    recipe_overrides,
    short,
    tta_option,
)
from transferkit.errors import UserError


def register(sub) -> None:
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
    recipe_overrides(
        evaluate, help="a data key for the data evaluated, e.g. data.image_column=path (repeatable)"
    )
    tta_option(evaluate)
    device_options(evaluate)
    evaluate.set_defaults(func=run_eval, preload=ENGINE_AND_METRICS)

    predict = sub.add_parser(
        "predict",
        help="predict every task for images or folders of images (a run folder or a .onnx file)",
    )
    predict.add_argument("run_dir", metavar="RUN_DIR_OR_ONNX")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--json", action="store_true")
    predict.add_argument(
        "--output", metavar="FILE", help="write a table (.csv or .parquet), one row per image"
    )
    table = predict.add_mutually_exclusive_group()
    table.add_argument(
        "--resume", action="store_true", help="--output exists: add only the images it lacks"
    )
    table.add_argument("--overwrite", action="store_true", help="--output exists: replace it")
    predict.add_argument(
        "--no-progress", action="store_true", help="no progress bar while writing --output"
    )
    predict.add_argument(
        "--bad-images",
        choices=("skip", "error"),
        default="skip",
        help="an unreadable image: listed (in the table's error column, or in the output) and "
        "the rest predicted (skip, the default), or stop with an error",
    )
    tta_option(predict)
    device_options(predict)
    predict.set_defaults(func=run_predict)

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
        "--soup", nargs="?", const="uniform", choices=["uniform", "greedy"],
        help="also evaluate a weight soup: uniform (the default: every member's weights averaged) "
        "or greedy (best first, each member added only if the soup's validation score improves)",
    )  # fmt: skip
    ens.add_argument(
        "--save-soup", metavar="DIR",
        help="write the soup as a model folder (eval, predict and export read it)",
    )  # fmt: skip
    ens.add_argument("--output", help="folder for ensemble_report.md and .json")
    ens.add_argument("--json", action="store_true")
    ens.set_defaults(
        func=run_ensemble, preload=lambda args: ENGINE_AND_METRICS if args.eval else ENGINE
    )


def run_eval(args: argparse.Namespace) -> int:
    from transferkit.inference import parse_tta
    from transferkit.runs import evaluate_run

    values = evaluate_run(
        args.run_dir, split=args.split, data=args.data, device=args.device,
        batch_size=args.batch_size, tta=parse_tta(args.tta), overrides=args.set or [],
    )  # fmt: skip
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        for key, value in values.items():
            print(f"{key:40s} {value:.4f}")
    return 0


def _print_predictions(results: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for row in results:
        if "error" in row:
            print(f"{row['image']}  unreadable: {row['error']}")
            continue
        tasks = "  ".join(f"{k}={short(v)}" for k, v in row.items() if k != "image")
        print(f"{row['image']}  {tasks}")


def run_predict(args: argparse.Namespace) -> int:
    from transferkit import load  # a .onnx file loads without torch
    from transferkit.inference import OnnxRun

    run = load(args.run_dir)
    tta = None
    if args.tta is not None and isinstance(run, OnnxRun):  # no torch here: OnnxRun refuses views
        tta = [view.strip() for view in args.tta.split(",") if view.strip() not in ("", "none")]
    elif args.tta is not None:  # the views are named beside torch's transforms
        from transferkit.inference import parse_tta

        tta = parse_tta(args.tta)
    if args.output:
        from transferkit.inference import write_predictions

        summary = write_predictions(
            run, args.images, args.output, resume=args.resume, overwrite=args.overwrite,
            batch_size=args.batch_size or 64, device=args.device, progress=not args.no_progress,
            tta=tta, bad_images=args.bad_images,
        )  # fmt: skip
        resumed = f" ({summary.already} were already there)" if summary.already else ""
        print(f"wrote {summary.written} rows to {summary.path}{resumed}")
        _say_skipped(summary.skipped, "its error column says why")
        return 0
    if args.resume or args.overwrite:
        raise UserError("--resume and --overwrite apply to --output FILE")
    results = run.predict(args.images, device=args.device, batch_size=args.batch_size or 64,
                          tta=tta, bad_images=args.bad_images)  # fmt: skip
    _print_predictions(results, args.json)
    _say_skipped([(r["image"], r["error"]) for r in results if "error" in r], "listed above")
    return 0


def _say_skipped(skipped: list[tuple[str, str]], where: str) -> None:
    if skipped:
        names = ", ".join(name for name, _ in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        print(f"skipped {len(skipped)} unreadable image(s): {names}{more} ({where}; "
              "--bad-images error stops at the first)", file=sys.stderr)  # fmt: skip


def run_ensemble(args: argparse.Namespace) -> int:
    from transferkit.runs import (
        ensemble_report,
        evaluate_ensemble,
        predict_ensemble,
        write_ensemble_report,
    )

    if args.predict:
        from transferkit.data import decode_prediction_inputs

        inputs = decode_prediction_inputs(args.predict)
        predictions = predict_ensemble(args.runs, [image for _, image in inputs])
        results = [{"image": name, **p} for (name, _), p in zip(inputs, predictions)]
        _print_predictions(results, args.json)
        return 0
    results = evaluate_ensemble(
        args.runs, args.split, args.data, with_soup=args.soup or False, save_soup=args.save_soup
    )
    if args.save_soup:  # beside the JSON on stdout, not in it
        print(f"wrote the {args.soup} soup to {args.save_soup}",
              file=sys.stderr if args.json else sys.stdout)  # fmt: skip
    if args.output:
        write_ensemble_report(results, Path(args.output))
    print(json.dumps(results, indent=2) if args.json else ensemble_report(results))
    return 0
