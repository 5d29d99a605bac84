"""`transferkit interpolate`: WiSE-FT, a fine-tuned run's backbone mixed with its start."""

from __future__ import annotations

import argparse

from transferkit.cli.common import ENGINE, device_options


def register(sub) -> None:
    mix = sub.add_parser(
        "interpolate",
        help="WiSE-FT: mix a run's fine-tuned backbone with its pretrained start at several "
        "alphas, keep its heads, evaluate each mix and plot the curve",
    )
    mix.add_argument("run_dir")
    mix.add_argument(
        "--alpha",
        default="0,0.25,0.5,0.75,1",
        help="mixing weights in [0, 1], comma-separated: 0 is the start, 1 the fine-tuned model",
    )
    mix.add_argument("--split", default="validation", help="split of the run's data to evaluate")
    mix.add_argument(
        "--start",
        help="another start: a weights file or run folder of the same architecture "
        "(default: the run recipe's model.weights)",
    )
    mix.add_argument("--save", metavar="FOLDER", help="write the best mix there as a model folder")
    mix.add_argument("--json", action="store_true", help="print the curve as JSON")
    device_options(mix)
    mix.set_defaults(func=run_interpolate, preload=ENGINE)


def run_interpolate(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from transferkit.rundir import RunDir
    from transferkit.runs import curve_table, interpolate

    curve = interpolate(args.run_dir, args.alpha, split=args.split, start=args.start,
                        save=args.save, device=args.device, batch_size=args.batch_size)  # fmt: skip
    if args.json:
        print(json.dumps(asdict(curve), indent=2))
        return 0
    print(curve_table(curve))
    folder = RunDir(args.run_dir)
    print(f"written: {folder.wise_ft_json}, {folder.wise_ft_plot}")
    if curve.saved:
        print(f"best mix (alpha {curve.best_alpha:g}) saved to {curve.saved}")
    return 0
