"""A run's model ready for inference: `run = transferkit.load(run_dir); run.predict(images)`.

Images are decoded by the same function as training (`open_image`: full decode, EXIF
orientation, RGB), preprocessed by the run's eval transform, and predicted in batches on the
chosen device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from transferkit.data import build_transforms
from transferkit.data.config import TTA_VIEWS
from transferkit.data.images import list_image_files, open_image
from transferkit.data.transforms import tta_views
from transferkit.errors import UserError
from transferkit.models import AuxHeadSpec, DataConfig, MultiTaskModel, TaskSpec, create_backbone
from transferkit.models.task_outputs import probabilities as prediction
from transferkit.run_dir import RunDir

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
class Run:
    """A trained model with its preprocessing: `run.predict(...)`, or `run.model(run.transform(img))`."""

    model: MultiTaskModel
    transform: Callable[[PIL.Image.Image], torch.Tensor]
    tasks: dict[str, TaskSpec]
    info: dict[str, Any]
    run_dir: RunDir | None = None

    @property
    def temperatures(self) -> dict[str, float]:
        """Per classification task, the temperature `transferkit calibrate` fitted ({} if none)."""
        return dict(self.info.get("temperatures") or {})

    def views(self, tta: list[str] | None = None) -> list[str]:
        """The test-time views to use: `tta`, or the recipe's `data.tta`; flips only where the
        recipe allows them (`data.horizontal_flip`)."""
        views = list(self.info.get("tta") or []) if tta is None else list(tta)
        if "hflip" in views and not self.info.get("horizontal_flip", True):
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
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """Per batch: the inputs' names and per task the probabilities (or values), on the CPU;
        calibrated when the run was, averaged over `tta` views (default: the recipe's)."""
        device = resolve_device(device)
        model = self.adjusted(tta).to(device).eval()
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        for name, tensor in _preprocessed(inputs, self.transform):
            names.append(name)
            tensors.append(tensor)
            if len(tensors) == batch_size:
                yield names, _forward(model, tensors, self.tasks, device)
                names, tensors = [], []
        if tensors:
            yield names, _forward(model, tensors, self.tasks, device)

    def predict(
        self,
        inputs: ImageInput | Iterable[ImageInput],
        device=None,
        batch_size: int = 64,
        tta: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Per image, per task: `{"label", "score"}` (classification) or `{"value"}`.

        `inputs`: image files or folders (searched recursively), PIL images, or tensors already
        preprocessed as `run.transform` does (`[3, H, W]`, or a batch `[N, 3, H, W]`); one of
        these or a list of them. `device`: None picks the GPU when there is one. `tta`: test-time
        views (`hflip`, `crops`), by default the recipe's `data.tta`.
        """
        return [
            {k: v for k, v in row.items() if k != "image"}
            for row in self.predict_named(inputs, device, batch_size, tta)
        ]

    def predict_named(
        self, inputs, device=None, batch_size: int = 64, tta: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Like `predict`, each result with `"image"`: its file path, or `input[i]`."""
        results = []
        for names, probabilities in self.probabilities(inputs, device, batch_size, tta):
            for i, name in enumerate(names):
                row = {
                    t: describe_prediction(s, probabilities[t][i]) for t, s in self.tasks.items()
                }
                results.append({"image": name, **row})
        return results


def _forward(model, tensors, tasks, device) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outputs = model(torch.stack(tensors).to(device))
    return {name: prediction(task, outputs[name]).cpu() for name, task in tasks.items()}


def _preprocessed(inputs, transform) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, model-ready tensor) for every image in `inputs`, decoded lazily."""
    single = isinstance(inputs, (str, os.PathLike, PIL.Image.Image, torch.Tensor))
    items = [inputs] if single else list(inputs)
    if not items:
        raise UserError("no images given: pass image files, folders, PIL images or tensors")
    for position, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            batch = item.unsqueeze(0) if item.ndim == 3 else item
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise UserError(
                    f"input[{position}]: a tensor must be [3, H, W] or [N, 3, H, W], already "
                    f"preprocessed (run.transform); got shape {list(item.shape)}"
                )
            for i, tensor in enumerate(batch):
                yield f"input[{position}][{i}]", tensor.float()
        elif isinstance(item, PIL.Image.Image):
            yield f"input[{position}]", transform(open_image(item))
        elif isinstance(item, (str, os.PathLike)):
            for file in _image_files(Path(item)):
                try:
                    image = open_image(file)
                except Exception as err:  # PIL raises many types
                    raise UserError(
                        f"cannot read image {file}: {type(err).__name__}: {err}"
                    ) from None
                yield str(file), transform(image)
        else:
            raise UserError(
                f"input[{position}]: cannot predict on a {type(item).__name__}; "
                "pass a path, a PIL image or a tensor"
            )


def _image_files(path: Path) -> list[Path]:
    path = path.expanduser()
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise UserError(f"no image files in folder {path}")
        return files
    if not path.is_file():
        raise UserError(f"no such image file or folder: {path}")
    return [path]


def describe_prediction(task: TaskSpec, p: torch.Tensor) -> dict[str, Any]:
    """A task's probabilities or values for one image, as `predict` prints them."""
    names = task.class_names
    if task.kind == "multiclass":
        index = int(p.argmax())
        return {"label": names[index] if names else index, "score": round(float(p[index]), 4)}
    if task.kind == "binary":
        positive = float(p) >= 0.5
        label = (names[1] if positive else names[0]) if names else int(positive)
        return {"label": label, "score": round(float(p) if positive else 1 - float(p), 4)}
    if task.kind == "multilabel":
        values = p.reshape(-1).tolist()
        on = [names[i] if names else i for i, v in enumerate(values) if v >= 0.5]
        return {"labels": on, "scores": [round(v, 4) for v in values]}
    values = p.reshape(-1).tolist()
    return {"value": round(values[0], 4) if len(values) == 1 else [round(v, 4) for v in values]}


def load(run_dir: str | os.PathLike | RunDir) -> Run:
    """Rebuild a run's saved model (the best epoch's) with its preprocessing."""
    from safetensors.torch import load_model

    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    info = folder.info()
    tasks = [TaskSpec.from_dict(t) for t in info["tasks"]]
    backbone = create_backbone(info["backbone"], None, **info.get("model_kwargs", {}))
    backbone.data_config = DataConfig.from_dict(info["data_config"])
    model = MultiTaskModel(backbone, tasks, [AuxHeadSpec(**a) for a in info.get("aux_heads", [])])
    try:
        load_model(model, str(folder.weights_path), strict=True)
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
