"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse


def short(value: dict) -> str:
    """One task's prediction in a few characters: `label (score)`, a value, or labels."""
    if "label" in value:
        return f"{value['label']} ({value['score']:.2f})"
    if "value" in value:
        return str(value["value"])
    return ",".join(map(str, value.get("labels", []))) or "-"  # "-": none of the labels


def fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch (default: 64, or the recipe's)",
    )


def recipe_overrides(
    parser: argparse.ArgumentParser, help: str = "override a recipe value (repeatable)"
) -> None:
    parser.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help=help)


def tta_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tta",
        metavar="VIEWS",
        help="test-time augmentation: hflip, crops (comma-separated) or none; "
        "default: the recipe's data.tta",
    )
