"""`transferkit export` (a run's model as ONNX, TorchScript or a torch.export program, checked
against PyTorch) and `transferkit push` (a finished run to the Hugging Face Hub)."""

from __future__ import annotations

import argparse

from transferkit.cli.common import ENGINE


def register(sub) -> None:
    from transferkit.rundir import EXPORTED  # torch-free; the format names are its keys

    export = sub.add_parser(
        "export", help="export a run's model (ONNX, TorchScript, torch.export) and check parity"
    )
    export.add_argument("run_dir")
    export.add_argument("--format", default="onnx", choices=list(EXPORTED))
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    batch = export.add_mutually_exclusive_group()
    batch.add_argument(
        "--static-batch", action="store_true",
        help="a graph for exactly one image (default: any batch size)",
    )  # fmt: skip
    # Before any batch size was the default it had to be asked for; old commands still run.
    batch.add_argument("--dynamic-batch", action="store_true", help=argparse.SUPPRESS)
    export.add_argument("--output", metavar="FILE", help="default: RUN_DIR/" + EXPORTED["onnx"])
    export.add_argument(
        "--include-aux", action="store_true", help="also export the auxiliary heads' outputs"
    )
    export.add_argument(
        "--tolerance", type=float,
        help="largest difference allowed between the file's and PyTorch's outputs (1e-3)",
    )  # fmt: skip
    export.add_argument(
        "--images", metavar="IMAGE_OR_FOLDER",
        help="images for the parity check (default: the run's validation data)",
    )  # fmt: skip
    export.add_argument("--parity-images", type=int, help="how many (default 8)")
    export.set_defaults(func=run_export, preload=ENGINE)

    push = sub.add_parser("push", help="upload a finished run folder to the Hugging Face Hub")
    push.add_argument("run_dir")
    push.add_argument("repo_id", help="the model repo, e.g. user/digits-transfer")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--token", help="a Hub token (default: the logged-in one, or HF_TOKEN)")
    push.set_defaults(func=run_push)


def run_export(args: argparse.Namespace) -> int:
    from transferkit.runs import export_run

    result = export_run(
        args.run_dir, args.format, output=args.output, opset=args.opset,
        dynamic_batch=not args.static_batch, include_aux=args.include_aux,
        tolerance=args.tolerance, images=args.images, parity_images=args.parity_images,
    )  # fmt: skip
    size = result.path.stat().st_size / 2**20
    print(f"wrote {result.path} ({result.format}, {size:.1f} MiB)")
    runner = "onnxruntime" if result.format == "onnx" else result.format
    print(f"parity on {result.images} images, {runner} vs PyTorch, largest |difference|:")
    for key, diff in result.parity.items():
        print(f"  {key:30s} {diff:.2e}")
    print(f"within the tolerance {result.tolerance:g}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from transferkit.runs import push_run

    result = push_run(args.run_dir, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.run_dir} to {result.repo_id}: {result.url}")
    return 0
