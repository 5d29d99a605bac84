"""`transferkit train`, `lr-find` and `sweep`: commands that train from a recipe."""

from __future__ import annotations

import argparse

from transferkit.cli.common import ENGINE, ENGINE_AND_METRICS, recipe_overrides
from transferkit.errors import UserError


def register(sub) -> None:
    train = sub.add_parser("train", help="fine-tune as a YAML recipe says")
    train.add_argument(
        "recipe",
        nargs="?",
        help="a recipe YAML, or a shipped recipe's name such as digits_transfer "
        "(optional with --resume: the run's own recipe)",
    )
    recipe_overrides(train)
    train.add_argument("--output", help="the run folder (default: OUTPUT_DIR/NAME from the recipe)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its newest complete checkpoint"
    )
    train.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="train afresh into a folder that holds a run, clearing it first",
    )
    train.add_argument(
        "--teacher", metavar="RUN_DIR",
        help="distil from this finished run (the recipe's distill.teacher; alpha 0.5, T 2)",
    )  # fmt: skip
    train.set_defaults(func=run_train, preload=ENGINE_AND_METRICS)

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
    recipe_overrides(finder)
    finder.add_argument("--output", help="the plot (default lr_find_<recipe>_phase<N>.png)")
    finder.set_defaults(func=run_lr_find, preload=ENGINE)

    sweep = sub.add_parser("sweep", help="train every combination of a grid and report the results")
    sweep.add_argument("recipe")
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a recipe key and its values (repeatable)",
    )
    recipe_overrides(sweep, help="a fixed override for every run")
    sweep.add_argument("--output", help="the sweep folder (default: OUTPUT_DIR/NAME_sweep)")
    sweep.add_argument(
        "--search",
        choices=("grid", "tpe", "random"),
        default="grid",
        help="grid: every combination, each in its own process (default); tpe or "
        "random: --trials combinations drawn by optuna, pruned on their curves",
    )
    sweep.add_argument("--trials", type=int, default=10, help="trials of --search tpe|random")
    sweep.set_defaults(func=run_sweep, preload=ENGINE_AND_METRICS)


def run_train(args: argparse.Namespace) -> int:
    from transferkit.engine import train
    from transferkit.recipes import resolve_recipe
    from transferkit.rundir import RunDir

    if args.teacher:  # a shortcut for the recipe key, applied before the other overrides
        args.set = [f"distill.teacher={args.teacher}", *(args.set or [])]
    # --resume alone continues with the run's own recipe.
    if args.resume and not args.recipe:
        folder = RunDir(args.resume)
        if folder.path.is_dir():
            with folder.claimed():  # in use: say so, before its recipe is read
                pass
        recipe = folder.resolved_recipe(args.set or [])
    elif args.recipe:
        recipe = resolve_recipe(args.recipe, args.set or [])
    else:
        raise UserError("train needs a RECIPE (or --resume RUN_DIR)")
    train(recipe, output=args.output, resume=args.resume, overwrite=args.overwrite,
          device=args.device)  # it ends by saying where the run folder is  # fmt: skip
    return 0


def run_lr_find(args: argparse.Namespace) -> int:
    from transferkit.recipes import load_recipe
    from transferkit.select import lr_find

    recipe = load_recipe(args.recipe, args.set or [])
    result, path = lr_find(recipe, args.phase, args.steps, args.output, args.min_lr, args.max_lr)
    print(
        f"phase {result.phase}: suggested train.lr {result.suggestion:.3g} "
        f"({len(result.lrs)} steps from {result.lrs[0]:.1e} to {result.lrs[-1]:.1e}); plot: {path}"
    )
    print(f"use it with: --set train.lr={result.suggestion:.3g}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from transferkit.select import parse_grid, sweep

    if args.search != "grid":
        from transferkit.select import search_sweep

        if args.trials < 1:
            raise UserError(f"--trials {args.trials}: give at least 1")
        root = search_sweep(args.recipe, parse_grid(args.grid), args.search, args.trials,
                            args.output, args.set or [])  # fmt: skip
        print(f"sweep folder: {root} (report.md, report.csv)")
        return 0
    root = sweep(args.recipe, parse_grid(args.grid), args.output, args.set or [])
    print(f"sweep folder: {root} (report.md, report.csv, report_*.png)")
    return 0
