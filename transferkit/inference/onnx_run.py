"""An exported ONNX model ready for inference without torch: `transferkit.load("model.onnx")`.

`transferkit export` writes the model's preprocessing and tasks into the file's metadata
(`METADATA_KEY`, one JSON document, also what `export_info` returns), so the `.onnx` file alone
is enough: images are decoded as in training (`open_image`), preprocessed by NumPy and PIL
(`transferkit.core.preprocess`), run by onnxruntime, and described like a run's predictions.
Nothing on this path imports torch.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.core import Preprocessing, TaskSpec
from transferkit.errors import UserError
from transferkit.inference.predictions import Predictor, batched, preprocessed, probabilities

METADATA_KEY = "transferkit"  # the ONNX metadata property holding the export's JSON
FORMAT_VERSION = 1
INPUT_NAME = "images"  # the graph's one input: preprocessed images [N, 3, H, W]


def is_onnx_file(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() == ".onnx"


def _check_export_info(info: dict[str, Any], where: str) -> dict[str, Any]:
    """The export's metadata, or a clear error when it is not a transferkit export's."""
    missing = [k for k in ("version", "tasks", "outputs", "preprocessing") if k not in info]
    if missing:
        raise UserError(
            f"{where}: the transferkit metadata lacks {', '.join(missing)}; export again"
        )
    if info["version"] > FORMAT_VERSION:
        raise UserError(
            f"{where} was exported by a newer transferkit (format {info['version']}); upgrade"
        )
    return info


@dataclass
class OnnxRun(Predictor):
    """An exported model and its preprocessing: `run.predict(images)`, as a run folder's `Run`.

    `run.transform(pil_image)` gives the NumPy input of one image; `run.outputs(batch)` the
    raw outputs (logits or values) per output name.
    """

    session: Any  # onnxruntime.InferenceSession
    transform: Preprocessing
    tasks: dict[str, TaskSpec]
    info: dict[str, Any]
    path: Path

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs of a preprocessed float32 batch `[N, 3, H, W]`, by output name.

        A graph exported with --static-batch takes exactly its batch size: the batch runs
        in chunks of that size, the last one padded with zeros (and the padding dropped).
        """
        names = [o.name for o in self.session.get_outputs()]
        fixed = self.session.get_inputs()[0].shape[0]
        if not isinstance(fixed, int) or fixed == len(batch):
            return dict(zip(names, self.session.run(names, {INPUT_NAME: batch})))
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, len(batch), fixed):
            chunk = batch[start : start + fixed]
            padded = np.concatenate(
                [chunk, np.zeros((fixed - len(chunk), *chunk.shape[1:]), chunk.dtype)]
            )
            for name, value in zip(names, self.session.run(names, {INPUT_NAME: padded})):
                parts[name].append(value[: len(chunk)])
        return {n: np.concatenate(v) for n, v in parts.items()}

    def probabilities(self, inputs, device=None, batch_size: int = 64, tta=None, skipped=None):
        """Per batch: the inputs' names and per task the probabilities (or values), as NumPy.

        `device` is accepted for the same calls as a `Run`; onnxruntime runs on its CPU
        provider unless the session was built with another (`load_onnx(providers=...)`).
        """
        if tta:  # the exported graph is one view's; averaging views would need torch's crops
            raise UserError(
                f"--tta {','.join(tta)}: test-time augmentation runs on a run folder, not on an "
                "exported ONNX file; predict with the run folder, or without --tta"
            )
        # `tta=None` means the run's own views (its data.tta); `[]` (--tta none) opts out.
        if tta is None and self.info.get("tta"):  # once per call site (Python's default filter)
            warnings.warn(
                f"{self.path.name}: the run predicts with test-time views "
                f"({', '.join(self.info['tta'])}, its data.tta) but an ONNX file runs one view "
                "per image, so these predictions are single-view; predict with the run folder "
                "for the averaged ones",
                stacklevel=2,
            )
        items = preprocessed(inputs, self.transform, np.ndarray,
                             lambda a: np.asarray(a, np.float32), "NumPy array", skipped)  # fmt: skip
        temperatures = self.info.get("temperatures") or {}
        for names, arrays in batched(items, batch_size):
            raw = self.outputs(np.stack(arrays))
            for task, temperature in temperatures.items():
                if task in raw and self.tasks[task].kind != "regression":
                    raw[task] = raw[task] / temperature
            yield names, {t: probabilities(spec, raw[t]) for t, spec in self.tasks.items()}


def load_onnx(path: str | os.PathLike, providers: list[str] | None = None) -> OnnxRun:
    """Open an ONNX file that `transferkit export` wrote; a clear error for any other file."""
    import onnxruntime

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"no such ONNX file: {path}")
    options = onnxruntime.SessionOptions()
    # Respect a thread limit set for the process (shared machines, several workers).
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    try:
        session = onnxruntime.InferenceSession(
            str(path), options, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise UserError(
            f"{path} is not a valid ONNX model: {str(err).splitlines()[0][:200]}"
        ) from None
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise UserError(
            f"{path} has no {METADATA_KEY!r} metadata: it was not written by `transferkit export`, "
            "so its preprocessing and tasks are unknown; export the run with transferkit"
        )
    info = _check_export_info(json.loads(raw), str(path))
    graph_outputs = [o.name for o in session.get_outputs()]
    tasks = {t["name"]: TaskSpec.from_dict(t) for t in info["tasks"]}
    absent = [name for name in tasks if name not in graph_outputs]
    if absent or [i.name for i in session.get_inputs()] != [INPUT_NAME]:
        raise UserError(
            f"{path}: the graph (inputs {[i.name for i in session.get_inputs()]}, outputs "
            f"{graph_outputs}) does not match its metadata (input {INPUT_NAME!r}, tasks "
            f"{list(tasks)}); export the run again"
        )
    preprocessing = Preprocessing.from_dict(info["preprocessing"])
    return OnnxRun(session, preprocessing, tasks, info, path)
