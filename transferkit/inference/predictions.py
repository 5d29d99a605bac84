"""What a prediction says, without torch: probabilities from a head's raw outputs (NumPy), and
one image's `{"label", "score"}` or `{"value"}` per task, as `predict` prints them.

Shared by the torch model (`transferkit.inference.run`) and the ONNX model (`transferkit.inference.onnx_run`);
`transferkit.models.task_outputs.probabilities` is the same rule on torch tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from transferkit.core import TaskSpec, list_image_files, open_image
from transferkit.errors import UserError

BAD_IMAGE_POLICIES = ("error", "skip")


class Predictor:
    """`predict` on top of a subclass's `tasks` and `probabilities`, which yields per batch the
    inputs' names and per task the probabilities (or values)."""

    tasks: dict[str, TaskSpec]

    def probabilities(
        self,
        inputs,
        device=None,
        batch_size: int = 64,
        tta: list[str] | None = None,
        skipped: list[tuple[str, str]] | None = None,
    ) -> Iterator[tuple]:
        """`skipped`: unreadable image files are added to it (name, reason) instead of failing."""
        raise NotImplementedError

    def predict(
        self,
        inputs,
        device=None,
        batch_size: int = 64,
        tta: list[str] | None = None,
        bad_images: str = "error",
    ) -> list[dict[str, Any]]:
        """Per image, its name under `"image"` (the file's path, or `input[i]`) and per task
        `{"label", "score"}` (classification) or `{"value"}`.

        `inputs`: image files or folders (searched recursively), PIL images, or arrays already
        preprocessed as `run.transform` does (`[3, H, W]`, or a batch `[N, 3, H, W]`); one of
        these or a list of them. `device`: None picks the GPU when there is one. `tta`:
        test-time views (`hflip`, `crops`), by default the recipe's `data.tta`. `bad_images`:
        "error" stops at an unreadable file; "skip" predicts the rest and gives each
        unreadable one a row `{"image", "error"}` at the end.
        """
        if bad_images not in BAD_IMAGE_POLICIES:
            raise UserError(
                f"bad_images: use {' or '.join(BAD_IMAGE_POLICIES)}, got {bad_images!r}"
            )
        skipped: list[tuple[str, str]] | None = [] if bad_images == "skip" else None
        results = []
        for names, probabilities in self.probabilities(inputs, device, batch_size, tta, skipped):
            for i, name in enumerate(names):
                row = {
                    t: describe_prediction(s, probabilities[t][i]) for t, s in self.tasks.items()
                }
                results.append({"image": name, **row})
        return results + [{"image": name, "error": reason} for name, reason in skipped or []]

    def predict_named(self, *args, **kwargs) -> list[dict[str, Any]]:
        """`predict` (which names each result now too), under its earlier name."""
        return self.predict(*args, **kwargs)


def preprocessed(
    inputs,
    transform: Callable,
    array_type: type,
    to_float: Callable,
    what: str = "tensor",
    skipped: list[tuple[str, str]] | None = None,
) -> Iterator[tuple[str, Any]]:
    """(name, model-ready array) for every image in `inputs`, decoded lazily.

    Inputs are paths (files or folders), PIL images, or arrays of `array_type` (a torch tensor
    or a NumPy array) already preprocessed, `[3, H, W]` or `[N, 3, H, W]`. An image file that
    cannot be read is an error, or, given a `skipped` list, added to it (name, reason).
    """
    single = isinstance(inputs, (str, os.PathLike, PIL.Image.Image, array_type))
    items = [inputs] if single else list(inputs)
    if not items:
        raise UserError("no images given: pass image files, folders, PIL images or tensors")
    for position, item in enumerate(items):
        if isinstance(item, array_type):
            batch = item[None] if item.ndim == 3 else item
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise UserError(
                    f"input[{position}]: a {what} must be [3, H, W] or [N, 3, H, W], already "
                    f"preprocessed (run.transform); got shape {list(item.shape)}"
                )
            for i, array in enumerate(batch):
                yield f"input[{position}][{i}]", to_float(array)
        elif isinstance(item, PIL.Image.Image):
            yield f"input[{position}]", transform(open_image(item))
        elif isinstance(item, (str, os.PathLike)):
            for file in image_files(Path(item)):
                try:
                    image = read_image(file)
                except UserError as err:
                    if skipped is None:
                        raise
                    skipped.append(
                        (str(file), str(err).removeprefix(f"cannot read image {file}: "))
                    )
                    continue
                yield str(file), transform(image)
        else:
            raise UserError(
                f"input[{position}]: cannot predict on a {type(item).__name__}; "
                f"pass a path, a PIL image or a {what}"
            )


def read_image(file: Path) -> PIL.Image.Image:
    """`open_image`, with a `UserError` naming the file when it cannot be decoded."""
    try:
        return open_image(file)
    except Exception as err:  # PIL raises many types
        raise UserError(f"cannot read image {file}: {type(err).__name__}: {err}") from None


def image_files(path: Path) -> list[Path]:
    """The image file, or the image files of a folder (recursively, sorted)."""
    path = path.expanduser()
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise UserError(f"no image files in folder {path}")
        return files
    if not path.is_file():
        raise UserError(f"no such image file or folder: {path}")
    return [path]


def batched(items: Iterable[tuple[str, Any]], size: int) -> Iterator[tuple[list[str], list]]:
    """(names, arrays) in batches of `size`, the last one shorter."""
    names: list[str] = []
    arrays: list = []
    for name, array in items:
        names.append(name)
        arrays.append(array)
        if len(arrays) == size:
            yield names, arrays
            names, arrays = [], []
    if arrays:
        yield names, arrays


def probabilities(task: TaskSpec, output: np.ndarray) -> np.ndarray:
    """Softmax (multiclass) or sigmoid (binary, multilabel) of the logits; regression values."""
    output = np.asarray(output, dtype=np.float32)
    if task.kind == "multiclass":
        shifted = np.exp(output - output.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    if task.kind in ("binary", "multilabel"):
        return 1.0 / (1.0 + np.exp(-output))
    return output


def describe_prediction(task: TaskSpec, p) -> dict[str, Any]:
    """A task's probabilities or values for one image (a torch tensor or NumPy array)."""
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


def table_columns(task: TaskSpec) -> list[str]:
    """The columns a task fills in a predictions table (see `table_row`)."""
    name = task.name
    if task.kind in ("multiclass", "binary"):
        return [name, f"{name}_score"]
    if task.kind == "multilabel":
        labels = task.class_names or [str(i) for i in range(task.num_outputs)]
        return [name, *(f"{name}_score_{label}" for label in labels)]
    if task.num_outputs == 1:
        return [name]
    return [f"{name}_{i}" for i in range(task.num_outputs)]


def table_row(task: TaskSpec, described: dict[str, Any]) -> list[Any]:
    """A task's cells of one table row, in `table_columns` order: label and score; the labels
    that are on (joined by ';') and every label's score; or the value(s)."""
    if "label" in described:
        return [described["label"], described["score"]]
    if "labels" in described:
        return [";".join(map(str, described["labels"])), *described["scores"]]
    value = described["value"]
    return list(value) if isinstance(value, list) else [value]
