"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import sys
from collections.abc import Callable, Iterator

# What a command imports first (`preload` in its defaults): the engine brings torch, timm,
# Accelerate, datasets and the models; a command that computes metrics (it trains and
# validates, or evaluates) also torchmetrics, which the engine imports only at first use.
ENGINE = ("transferkit.engine",)
ENGINE_AND_METRICS = (*ENGINE, "torchmetrics")


def preload(modules: tuple[str, ...] | Callable[[argparse.Namespace], tuple[str, ...]] | None,
            args: argparse.Namespace) -> None:  # fmt: skip
    """Import `modules` (or what `modules(args)` names, for a command whose options decide it)
    under `imports_without_gc`, before the command imports them piecemeal."""
    if callable(modules):
        modules = modules(args)
    if modules:
        with imports_without_gc():
            for module in modules:
                importlib.import_module(module)


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """The process's first import of torch and the rest, with the garbage collector off, and
    what it made frozen afterwards (Python's documented pattern for long-lived objects).

    The imports make about a million objects that live as long as the process; collecting
    them again and again while they are made took 0.9 s of a 7 s start-up here. Frozen, later
    collections skip them, and forked loader workers leave their pages shared. Where torch is
    imported already (a notebook, the tests) it does nothing.
    """
    if "torch" in sys.modules or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


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
