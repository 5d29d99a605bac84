"""`transferkit rank`: score candidate backbones (or layer groups) on a recipe's data."""

from __future__ import annotations

import argparse

from transferkit.cli.common import ENGINE, device_options, recipe_overrides


def _names(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def register(sub) -> None:
    rank = sub.add_parser(
        "rank",
        help="rank candidate backbones (or layer groups) by transferability (LogME, kNN) "
        "from frozen features, without training",
    )
    rank.add_argument("recipe", help="a recipe YAML or a shipped recipe's name: its train data")
    rank.add_argument(
        "--backbones",
        metavar="A,B,C",
        help="candidates SOURCE:NAME[@WEIGHTS], WEIGHTS pretrained (default), none, a file or "
        "a run folder; default: the recipe's backbone and weights",
    )
    rank.add_argument(
        "--groups",
        metavar="G1,G2|all",
        help="also score the features after these layer groups of each backbone (pooled)",
    )
    recipe_overrides(rank)
    rank.add_argument("--output", default=".", help="folder for rank_<recipe>.json and .png")
    device_options(rank)
    rank.set_defaults(func=run_rank, preload=ENGINE)


def run_rank(args: argparse.Namespace) -> int:
    from transferkit.recipes import load_recipe
    from transferkit.select import primary_task, rank, rank_table, write_ranking

    recipe = load_recipe(args.recipe, args.set or [])
    rows = rank(recipe, _names(args.backbones), _names(args.groups), device=args.device,
                batch_size=args.batch_size)  # fmt: skip
    print(rank_table(rows, primary_task(recipe)))
    json_path, plot_path = write_ranking(rows, recipe.name, args.output)
    print(f"written: {json_path}, {plot_path}")
    return 0
