"""A run's model ready for inference: `run = transferkit.load(run_dir); run.predict(images)`.

Images are decoded by the same function as training (`open_image`: full decode, EXIF
orientation, RGB), preprocessed by the run's eval transform, and predicted in batches on the
chosen device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch

from transferkit.data import build_transforms
from transferkit.errors import UserError
from transferkit.models import AuxHeadSpec, DataConfig, MultiTaskModel, TaskSpec, create_backbone
from transferkit.models.adapters import AdapterSpec, attach_adapter
from transferkit.models.task_outputs import probabilities as prediction
from transferkit.predictions import Predictor, batched, describe_prediction, preprocessed
from transferkit.run_dir import RunDir

# describe_prediction is imported from here by callers written before it moved.
__all__ = ["Run", "describe_prediction", "load", "load_run", "resolve_device"]

ImageInput = str | os.PathLike | PIL.Image.Image | torch.Tensor


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto": the GPU when there is one, else the CPU; otherwise as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device!r}: {err}; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use cpu or auto")
    return resolved


@dataclass
class Run(Predictor):
    """A trained model with its preprocessing: `run.predict(...)`, or `run.model(run.transform(img))`."""

    model: MultiTaskModel
    transform: Callable[[PIL.Image.Image], torch.Tensor]
    tasks: dict[str, TaskSpec]
    info: dict[str, Any]
    run_dir: RunDir | None = None

    def probabilities(
        self, inputs: ImageInput | Iterable[ImageInput], device=None, batch_size: int = 64
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """Per batch: the inputs' names and per task the probabilities (or values), on the CPU."""
        device = resolve_device(device)
        model = self.model.to(device).eval()
        items = preprocessed(inputs, self.transform, torch.Tensor, torch.Tensor.float)
        for names, tensors in batched(items, batch_size):
            yield names, _forward(model, tensors, self.tasks, device)


def _forward(model, tensors, tasks, device) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outputs = model(torch.stack(tensors).to(device))
    return {name: prediction(task, outputs[name]).cpu() for name, task in tasks.items()}


def load(run_dir: str | os.PathLike | RunDir) -> Run:
    """Rebuild a run's saved model (the best epoch's) with its preprocessing.

    An exported `.onnx` file gives an `OnnxRun` instead (onnxruntime, no torch needed).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from transferkit.onnx_run import is_onnx_file, load_onnx

    if not isinstance(run_dir, RunDir) and is_onnx_file(run_dir):
        return load_onnx(run_dir)
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    info = folder.info()
    tasks = [TaskSpec.from_dict(t) for t in info["tasks"]]
    backbone = create_backbone(info["backbone"], None, **info.get("model_kwargs", {}))
    backbone.data_config = DataConfig.from_dict(info["data_config"])
    if info.get("adapter"):  # the saved weights include the adapter's: inject it first
        attach_adapter(backbone, AdapterSpec.from_dict(info["adapter"]))
    model = MultiTaskModel(backbone, tasks, [AuxHeadSpec(**a) for a in info.get("aux_heads", [])])
    try:
        load_model(model, str(folder.weights_path), strict=True)
    except SafetensorError as err:  # a truncated or corrupt file
        raise UserError(
            f"{folder.weights_path} cannot be read ({err}); train the run again"
        ) from None
    except RuntimeError as err:
        raise UserError(
            f"{folder.weights_path} does not match {folder.info_path}: "
            f"{str(err).splitlines()[0][:200]}"
        ) from None
    transform = build_transforms(
        backbone.data_config, train=False, augment="none", image_size=info.get("image_size")
    )
    return Run(model.eval(), transform, {t.name: t for t in tasks}, info, folder)


load_run = load
