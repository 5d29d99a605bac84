"""`transferkit calibrate`: fit a temperature per classification task of a finished run."""

from __future__ import annotations

import argparse
import json

from transferkit.cli.common import ENGINE, device_options


def register(sub) -> None:
    calibrate = sub.add_parser(
        "calibrate",
        help="fit a temperature per classification task on the validation split (model.json) "
        "and draw a reliability diagram",
    )
    calibrate.add_argument("run_dir")
    calibrate.add_argument(
        "--split", default="validation", help="split to fit on (default: validation)"
    )
    calibrate.add_argument(
        "--tta",
        help="test-time views to fit on, e.g. crops (default: the recipe's data.tta, which "
        "predict and eval use; none for single images)",
    )
    calibrate.add_argument("--json", action="store_true")
    device_options(calibrate)
    calibrate.set_defaults(func=run_calibrate, preload=ENGINE)


def run_calibrate(args: argparse.Namespace) -> int:
    from transferkit.inference import parse_tta
    from transferkit.rundir import RunDir
    from transferkit.runs import calibrate_run

    tta = parse_tta(args.tta)
    report = calibrate_run(args.run_dir, args.split, args.device, args.batch_size or 64, tta)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, row in report.items():
        print(
            f"{name}: temperature {row['temperature']:.3f} | ECE {row['ece_before']:.4f} -> "
            f"{row['ece_after']:.4f} | NLL {row['nll_before']:.4f} -> {row['nll_after']:.4f} "
            f"({row['rows']} rows)"
        )
    print(f"reliability diagram: {RunDir(args.run_dir).reliability_path}")
    return 0
