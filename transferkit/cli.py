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


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


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
