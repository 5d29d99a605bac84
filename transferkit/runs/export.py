"""`transferkit export`: a run's model as ONNX, TorchScript or a torch.export program, checked.

    result = export_run("runs/digits_transfer", "onnx")   # runs/digits_transfer/model.onnx
    result.parity                                          # {task: largest |difference|}

One graph, one input `images` (`[N, 3, H, W]`, preprocessed) and one named output per task
(raw logits or values, as the heads return them); auxiliary heads are left out unless asked
for. The preprocessing and tasks travel as JSON (`transferkit.inference.onnx_run.METADATA_KEY`): in the
ONNX file's metadata properties, or in `FILE.json` beside a TorchScript or torch.export file.

After writing, the file is checked against the PyTorch model on a few real images of the run's
validation data (or `images=`): onnxruntime runs the ONNX file on images preprocessed by NumPy
(`transferkit.core.preprocess`, the path a deployment without torch takes), the PyTorch model runs on
the run's torch eval transform, and the largest difference per output must stay within the
tolerance, else the file is removed and a `UserError` says by how much it differed.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.core import VERSION, Preprocessing
from transferkit.errors import UserError
from transferkit.inference import (
    FORMAT_VERSION,
    INPUT_NAME,
    METADATA_KEY,
    Run,
    image_files,
    load_onnx,
    read_image,
)
from transferkit.inference import load as load_run
from transferkit.models import merge_adapters
from transferkit.rundir import EXPORTED, RunDir

FORMATS = tuple(EXPORTED)  # onnx, torchscript, exported-program
DEFAULT_TOLERANCE = 1e-3  # largest |difference| of any raw output (logit or value)
PARITY_IMAGES = 8


@dataclass
class ExportResult:
    """What `export_run` wrote and how closely the file reproduces the PyTorch model."""

    path: Path
    format: str
    info: dict
    parity: dict[str, float] = field(default_factory=dict)  # output -> largest |difference|
    images: int = 0  # how many images the parity check used
    tolerance: float = DEFAULT_TOLERANCE


class _Outputs(nn.Module):
    """The model with a tuple of outputs in a fixed order, as exporters need."""

    def __init__(self, model: nn.Module, keys: list[str], with_aux: bool) -> None:
        super().__init__()
        self.model, self.keys, self.with_aux = model, keys, with_aux

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.with_aux:
            outputs = self.model(images)
        else:  # the heads on pooled features: the auxiliary heads' feature maps are not computed
            outputs = self.model(features=self.model.backbone(images))
        return tuple(outputs[key] for key in self.keys)


def export_run(
    run_dir,
    fmt: str = "onnx",
    output: str | Path | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    include_aux: bool = False,
    tolerance: float | None = None,
    images: str | Path | None = None,
    parity_images: int | None = None,
) -> ExportResult:
    """Export a run's model (the best epoch's) and check it; see the module docstring.

    `images`: a file or folder of images for the parity check, instead of the run's
    validation data. `dynamic_batch` (default): any batch size; False: the file takes exactly one image.
    `tolerance` (default 1e-3) and `parity_images` (default 8): the parity check's.
    """
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    parity_images = PARITY_IMAGES if parity_images is None else parity_images
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise UserError("--opset applies to --format onnx only")
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    path = Path(output) if output else folder.exported_path(fmt)
    suffix = {"onnx": ".onnx", "exported-program": ".pt2"}.get(fmt)
    if suffix and path.suffix.lower() != suffix:  # what the loaders recognise the file by
        raise UserError(f"--output {path}: a {fmt} file must end in {suffix}")
    run = load_run(folder)
    # A peft adapter is folded into its base layers: the file holds plain layers only, which
    # every runtime knows, and computes the same outputs (the parity check below proves it).
    merge_adapters(run.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(run.tasks) + (list(run.model.output_keys[len(run.tasks) :]) if include_aux else [])
    module = _Outputs(run.model, keys, include_aux).eval()
    pictures = _parity_images(folder, images, parity_images)
    info = export_info(run, fmt, keys, dynamic_batch, opset)
    # An example batch of 2, not 1: torch.export specializes a dimension of size 1 to a constant.
    example = torch.stack([run.transform(p) for p in pictures[: 2 if dynamic_batch else 1]])
    if len(example) < (2 if dynamic_batch else 1):
        example = example.repeat(2, 1, 1, 1)
    with torch.no_grad():
        _write(module, example, path, fmt, info, dynamic_batch, opset)
    result = ExportResult(path, fmt, info, images=len(pictures), tolerance=tolerance)
    result.parity = check_parity(path, fmt, run, module, pictures, dynamic_batch)
    over = {k: v for k, v in result.parity.items() if not v <= tolerance}  # NaN fails too
    if over:
        for file in (path, _sidecar(path)):
            file.unlink(missing_ok=True)
        raise UserError(
            f"parity check failed: the exported {fmt} model differs from the PyTorch model by "
            + ", ".join(f"{k} {v:.3g}" for k, v in over.items())
            + f" (tolerance {tolerance:g}) on {len(pictures)} images; {path} was removed. "
            "Try another --opset or format, or raise --tolerance if the difference is acceptable"
        )
    return result


def export_info(run: Run, fmt: str, keys: list[str], dynamic_batch: bool, opset) -> dict:
    """The JSON that travels with the file: preprocessing, tasks, outputs and provenance."""
    preprocessing = Preprocessing.from_config(run.model.backbone.data_config, run.info.image_size)
    return {
        "version": FORMAT_VERSION,
        "format": fmt,
        "input": INPUT_NAME,
        "outputs": keys,
        "batch_size": None if dynamic_batch else 1,
        "opset": opset,
        "tasks": [spec.to_dict() for spec in run.tasks.values()],
        "preprocessing": preprocessing.to_dict(),
        "backbone": run.info.backbone,
        "epoch": run.info.epoch,
        "monitor": run.info.monitor,
        # `transferkit calibrate`'s temperatures: the graph's outputs stay raw logits, and
        # `OnnxRun` divides them as `Run` does, so calibrated probabilities survive export.
        "temperatures": run.temperatures,
        # The run's test-time views (data.tta): the graph is one view's, so `OnnxRun` warns
        # that its predictions are single-view where the run folder's would be averaged.
        "tta": run.views(),
        "run": str(run.run_dir.path.resolve()) if run.run_dir else None,
        "transferkit": VERSION,
    }


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write(module, example, path: Path, fmt: str, info: dict, dynamic: bool, opset) -> None:
    batch = torch.export.Dim("batch", min=1) if dynamic else None
    if fmt == "onnx":
        import onnx

        # The dynamo exporter (torch.onnx's default) goes through torch.export, as
        # exported-program does; tested on timm and torchvision backbones.
        torch.onnx.export(
            module, (example,), str(path), input_names=[INPUT_NAME], output_names=info["outputs"],
            opset_version=opset, dynamic_shapes=({0: batch},) if dynamic else None, dynamo=True,
            external_data=False, verbose=False,
        )  # fmt: skip
        model = onnx.load(str(path))
        written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if opset is not None and written != opset:
            # The dynamo exporter writes opset 18 and converts down with onnx's version
            # converter; when that fails it keeps 18 and only logs it.
            path.unlink()
            raise UserError(
                f"--opset {opset}: the ONNX exporter could not convert this model to opset "
                f"{opset} and wrote opset {written}; use --opset {written} or newer (or leave "
                "--opset out)"
            )
        info["opset"] = written  # what the file holds, also when --opset was left out
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(info)
        onnx.save(model, str(path))
        return
    if fmt == "torchscript":
        # Tracing records one batch size's shapes only where the model reads them (timm and
        # torchvision CNNs do not); the parity check runs another batch size when dynamic.
        # TorchScript is deprecated in favour of torch.export, and says so at every call.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.trace(module, example), str(path))
    else:
        program = torch.export.export(
            module, (example,), dynamic_shapes=({0: batch},) if dynamic else None
        )
        torch.export.save(program, str(path))
    _sidecar(path).write_text(json.dumps(info, indent=2))


def check_parity(path: Path, fmt: str, run: Run, module, pictures, dynamic: bool) -> dict:
    """Largest |difference| per output between the file and the PyTorch model on `pictures`."""
    reference_batch = torch.stack([run.transform(p) for p in pictures])
    with torch.no_grad():
        reference = [o.numpy() for o in module(reference_batch)]
    if fmt == "onnx":
        exported = load_onnx(path)
        # The deployment path: NumPy preprocessing from the file's own metadata.
        found = exported.outputs(np.stack([exported.transform(p) for p in pictures]))
        outputs = [found[key] for key in module.keys]
    else:
        loaded = (
            torch.jit.load(str(path))
            if fmt == "torchscript"
            else torch.export.load(str(path)).module()
        )
        # A fixed-batch file runs one image at a time; a dynamic one takes all of them at once.
        batches = [reference_batch] if dynamic else list(reference_batch.split(1))
        with torch.no_grad():
            parts = [[o.numpy() for o in loaded(b)] for b in batches]
        outputs = [np.concatenate([p[i] for p in parts]) for i in range(len(module.keys))]
    return {
        key: float(np.abs(np.asarray(got, np.float64) - want).max()) if want.size else 0.0
        for key, got, want in zip(module.keys, outputs, reference)
    }


def _parity_images(folder: RunDir, images, count: int) -> list:
    """A few real images: from `images`, or the run's validation split."""
    if count < 1:
        raise UserError("--parity-images must be at least 1")
    if images is not None:
        return [read_image(file) for file in image_files(Path(images))[:count]]
    from transferkit.data import TaskImageDataset
    from transferkit.runs.evaluate import eval_split

    try:
        recipe, rows, _ = eval_split(folder, "validation")
    except UserError as err:
        raise UserError(
            f"the parity check needs real images and the run's validation data cannot be "
            f"loaded ({err}); run from the folder the run was trained in, or pass --images FOLDER"
        ) from None
    if len(rows) == 0:
        raise UserError("the run's validation split is empty; pass --images FOLDER")
    rows = rows.select(range(min(count, len(rows))))
    dataset = TaskImageDataset(rows, [], lambda image: image, bad_images=recipe.data.bad_images)
    return [dataset[i]["image"] for i in range(len(dataset))]
