"""`transferkit inspect`: a backbone's layer groups, what a freeze spec trains, preprocessing."""

from __future__ import annotations

import argparse
import json

from transferkit.cli.common import fmt


def register(sub) -> None:
    parser = sub.add_parser(
        "inspect",
        help="show a backbone's layer groups, what a freeze spec trains, and its preprocessing",
    )
    parser.add_argument("backbone", help="SOURCE:NAME, e.g. timm:resnet18 or torchvision:resnet50")
    parser.add_argument(
        "--weights", default=None, help="none (default), pretrained, or a local file"
    )
    parser.add_argument(
        "--freeze",
        default="none",
        help="freeze spec, e.g. all, up_to:layer3, train:layer4, regex:PATTERN",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="count what a peft adapter trains: lora, dora, loha or ia3 (with --adapter-targets)",
    )
    parser.add_argument(
        "--adapter-targets",
        nargs="+",
        default=[],
        metavar="TARGET",
        help="layer groups or regex:PATTERN for --adapter (as model.adapter.targets)",
    )
    parser.add_argument("--adapter-r", type=int, default=8, help="the adapter's rank (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transferkit.models import create_backbone

    # Without weights the structure is all we need: build on the meta device (no memory, instant).
    device = "meta" if args.weights in (None, "none", "random") else None
    backbone = create_backbone(args.backbone, weights=args.weights, device=device)
    adapter = None
    if args.adapter:
        from transferkit.models import AdapterSpec, attach_adapter

        spec = AdapterSpec(args.adapter, tuple(args.adapter_targets), r=args.adapter_r)
        adapter = attach_adapter(backbone, spec)
    backbone.freeze(args.freeze)
    adapter_info = adapter and {
        "method": adapter.spec.method,
        "modules": len(adapter.modules),
        "params": sum(
            p.numel() for n, p in backbone.model.named_parameters() if n in adapter.tensors
        ),
    }
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
            "adapter": adapter_info,
        }
        print(json.dumps(report, indent=2))
        return 0
    dc = backbone.data_config
    print(f"{backbone.name}   features: {backbone.num_features}   freeze: {backbone.freeze_spec}")
    if backbone.load_report:
        print(f"weights: {backbone.load_report}")
    if adapter_info:
        print(f"adapter: {adapter_info['method']} on {adapter_info['modules']} layers, "
              f"{adapter_info['params']:,} parameters (the layers it adapts stay frozen)")  # fmt: skip
    print(
        f"preprocessing: input {'x'.join(map(str, dc.input_size))}, mean {fmt(dc.mean)}, std {fmt(dc.std)}, "
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
