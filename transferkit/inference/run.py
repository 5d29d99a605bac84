"""A run's model ready for inference: `run = transferkit.load(run_dir); run.predict(images)`.

Images are decoded by the same function as training (`open_image`: full decode, EXIF
orientation, RGB), preprocessed by the run's eval transform, and predicted in batches on the
chosen device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import PIL.Image
import torch

from transferkit.data import TTA_VIEWS, build_transforms, tta_views
from transferkit.errors import UserError
from transferkit.inference.predictions import Predictor, batched, describe_prediction, preprocessed
from transferkit.models import (
    MultiTaskModel,
    TaskSpec,
)
from transferkit.models import probabilities as prediction
from transferkit.rundir import ModelInfo, RunDir, load_saved_model

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


class AdjustedModel(torch.nn.Module):
    """A run's model as eval and predict use it: each task's output averaged over test-time
    views (logits, so a temperature still applies), classification logits divided by the
    task's temperature (`transferkit calibrate`). Auxiliary heads are left out."""

    def __init__(self, model, tasks: dict[str, TaskSpec], views=(), temperatures=None) -> None:
        super().__init__()
        self.model, self.tasks, self.views = model, tasks, tuple(views)
        self.temperatures = dict(temperatures or {})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = [self.model(view) for view in tta_views(images, self.views)]
        mean = {t: torch.stack([o[t].float() for o in outputs]).mean(0) for t in self.tasks}
        for name, temperature in self.temperatures.items():
            if name in mean and self.tasks[name].kind != "regression":
                mean[name] = mean[name] / temperature
        return mean


def parse_tta(text: str | None) -> list[str] | None:
    """`--tta hflip,crops` (or none) as a list of views; None when the flag was not given."""
    if text is None:
        return None
    views = [v.strip() for v in text.split(",") if v.strip() and v.strip() != "none"]
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown:
        raise UserError(f"--tta {text}: unknown view {unknown[0]!r}; use {', '.join(TTA_VIEWS)} "
                        "(comma-separated) or none")  # fmt: skip
    return views


@dataclass
class Run(Predictor):
    """A trained model with its preprocessing: `run.predict(...)`, or `run.model(run.transform(img))`."""

    model: MultiTaskModel
    transform: Callable[[PIL.Image.Image], torch.Tensor]
    tasks: dict[str, TaskSpec]
    info: ModelInfo
    run_dir: RunDir | None = None

    @property
    def temperatures(self) -> dict[str, float]:
        """Per classification task, the temperature `transferkit calibrate` fitted ({} if none)."""
        return dict(self.info.temperatures)

    def views(self, tta: list[str] | None = None) -> list[str]:
        """The test-time views to use: `tta`, or the recipe's `data.tta`; flips only where the
        recipe allows them (`data.horizontal_flip`)."""
        views = list(self.info.tta) if tta is None else list(tta)
        if "hflip" in views and not self.info.horizontal_flip:
            raise UserError(
                "test-time flips (--tta hflip) are forbidden for this run: its recipe sets "
                "data.horizontal_flip: false (these images must not be mirrored); use --tta "
                "crops, or none"
            )
        return views

    def adjusted(self, tta: list[str] | None = None) -> AdjustedModel:
        """The model with test-time augmentation and calibrated temperatures, for eval."""
        return AdjustedModel(self.model, self.tasks, self.views(tta), self.temperatures)

    def probabilities(
        self,
        inputs: ImageInput | Iterable[ImageInput],
        device=None,
        batch_size: int = 64,
        tta: list[str] | None = None,
        skipped: list[tuple[str, str]] | None = None,
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """Per batch: the inputs' names and per task the probabilities (or values), on the CPU;
        calibrated when the run was, averaged over `tta` views (default: the recipe's)."""
        device = resolve_device(device)
        model = self.adjusted(tta).to(device).eval()
        items = preprocessed(inputs, self.transform, torch.Tensor, torch.Tensor.float,
                             skipped=skipped)  # fmt: skip
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
    from transferkit.inference.onnx_run import is_onnx_file, load_onnx

    if not isinstance(run_dir, RunDir) and is_onnx_file(run_dir):
        return load_onnx(run_dir)
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    model, info = load_saved_model(folder)
    transform = build_transforms(
        model.backbone.data_config, train=False, augment="none", image_size=info.image_size
    )
    return Run(model.eval(), transform, info.task_specs, info, folder)


load_run = load
