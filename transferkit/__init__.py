"""transferkit: fine-tune timm and torchvision backbones with frozen layers and multi-task heads.

The Python API (see `transferkit.api`): `fine_tune(recipe, data=...)` trains and returns a
`FineTuneResult`; `load(run_dir)` gives a run's model back for `predict` (`load("model.onnx")`
an exported one, through onnxruntime); `RunDir(path)` reads a run folder (records, best and
final metrics, checkpoints); `interpolate(run_dir, alphas)` is WiSE-FT (`transferkit.wise_ft`);
`rank(recipe, candidates)` scores backbones before training (`transferkit.transferability`).
"""

from transferkit.errors import UserError
from transferkit.run_dir import RunDir
from transferkit.task_spec import TaskSpec

__version__ = "0.1.0"
__all__ = [
    "AuxHeadSpec",
    "Backbone",
    "DataConfig",
    "FineTuneResult",
    "FreezeSpec",
    "MultiTaskModel",
    "OnnxRun",
    "Run",
    "RunDir",
    "TaskSpec",
    "UserError",
    "create_backbone",
    "evaluate_run",
    "fine_tune",
    "interpolate",
    "load",
    "load_recipe",
    "rank",
    "train",
]

# Names that pull in torch, Accelerate, datasets or torchjd are imported on first use, so
# `import transferkit` stays light and an exported ONNX model loads without torch.
_LAZY = {
    "AuxHeadSpec": "transferkit.models",
    "Backbone": "transferkit.models",
    "DataConfig": "transferkit.models",
    "FreezeSpec": "transferkit.models",
    "MultiTaskModel": "transferkit.models",
    "create_backbone": "transferkit.models",
    "fine_tune": "transferkit.api",
    "FineTuneResult": "transferkit.api",
    "Run": "transferkit.inference",
    "OnnxRun": "transferkit.onnx_run",
    "train": "transferkit.engine",
    "evaluate_run": "transferkit.engine.evaluate",
    "load_recipe": "transferkit.recipes",
    # Modules named apart from their functions: importing `transferkit.interpolate` would
    # otherwise replace the function `transferkit.interpolate` with the module.
    "interpolate": "transferkit.wise_ft",
    "rank": "transferkit.transferability",
}


def load(path):
    """A model ready for `predict`: a run folder's (`transferkit.inference.Run`, torch), or an
    exported `.onnx` file's (`transferkit.onnx_run.OnnxRun`, onnxruntime, no torch needed)."""
    from transferkit.onnx_run import is_onnx_file, load_onnx

    if is_onnx_file(path):
        return load_onnx(path)
    from transferkit.inference import load as load_run

    return load_run(path)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
