"""`transferkit fit DATA`: from a folder of class folders or a table to a trained model, with
the plan printed and written first (`transferkit.select.fit`)."""

from __future__ import annotations

import argparse

from transferkit.cli.common import ENGINE, ENGINE_AND_METRICS, recipe_overrides
from transferkit.errors import UserError
from transferkit.select import DEFAULT_BUDGET_MINUTES
from transferkit.select import FIT_METHODS as METHODS


def register(sub) -> None:
    fit = sub.add_parser(
        "fit", help="plan and train a model for a folder of class folders or a table, no recipe"
    )
    fit.add_argument(
        "data",
        help="a folder (FOLDER/CLASS/IMAGE.jpg), a CSV/JSON/Parquet table, "
        "or a dataset saved with save_to_disk",
    )
    fit.add_argument("--output", help="the run folder (default runs/NAME_fit)")
    fit.add_argument("--dry-run", action="store_true", help="print and write the plan, no training")
    fit.add_argument("--task", action="append", metavar="COLUMN=KIND",
                     help="a column's task kind: multiclass, binary, multilabel or regression")  # fmt: skip
    fit.add_argument("--ignore", action="append", metavar="COLUMN", help="a column that is no task")
    fit.add_argument("--image-column", help="the column of image paths (default: found)")
    recipe_overrides(fit, help="change a value of the planned recipe (repeatable)")
    fit.add_argument("--overwrite", action="store_true", help="clear a run already in --output")
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    fit.add_argument(
        "--time-budget",
        type=float,
        default=DEFAULT_BUDGET_MINUTES,
        metavar="MIN",
        help=f"minutes for the search and its runs (default {DEFAULT_BUDGET_MINUTES:g})",
    )
    fit.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="the methods the search may choose (default: all of them)",
    )
    fit.add_argument(
        "--backbones",
        help="candidate backbones, comma-separated (default: the "
        "ImageNet EfficientNet-Lites whose weights load offline)",
    )
    fit.add_argument("--max-trials", type=int, help="stop the search after this many trials")
    fit.add_argument("--no-search", action="store_true",
                     help="train the plan's plain defaults (LP-FT at lr 1e-3), no trials")  # fmt: skip
    fit.set_defaults(
        func=run_fit, preload=lambda args: ENGINE if args.dry_run else ENGINE_AND_METRICS
    )


def run_fit(args: argparse.Namespace) -> int:
    from transferkit.select import fit

    tasks = {}
    for item in args.task or []:
        column, sep, kind = item.partition("=")
        if not sep or not column or not kind:
            raise UserError(f"--task {item}: write COLUMN=KIND, e.g. --task size=regression")
        tasks[column] = kind
    fit(args.data, args.output, dry_run=args.dry_run, tasks=tasks, ignore=tuple(args.ignore or ()),
        image_column=args.image_column, overrides=args.set or [], overwrite=args.overwrite,
        device=args.device, time_budget=args.time_budget,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        backbones=[b.strip() for b in args.backbones.split(",")] if args.backbones else None,
        max_trials=args.max_trials, search_choices=not args.no_search)  # fmt: skip
    return 0
