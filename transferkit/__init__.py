"""transferkit: fine-tune timm and torchvision backbones with frozen layers and multi-task heads.

The Python API (see `transferkit.api`): `fine_tune(recipe, data=...)` trains and returns a
`FineTuneResult`; `load(run_dir)` gives a run's model back for `predict` (`load("model.onnx")`
an exported one, through onnxruntime); `RunDir(path)` reads a run folder (records, best and
final metrics, checkpoints); `interpolate(run_dir, alphas)` is WiSE-FT (`transferkit.runs.wise_ft`);
`rank(recipe, candidates)` scores backbones before training (`transferkit.select.transferability`).
"""

from transferkit.core import VERSION, TaskSpec, lazy_exports
from transferkit.errors import UserError
from transferkit.rundir import RunDir

__version__ = VERSION

# Names that pull in torch, Accelerate, datasets or torchjd are imported on first use, so
# `import transferkit` stays light and an exported ONNX model loads without torch.
_WHERE = {
    "AuxHeadSpec": "transferkit.models",
    "Backbone": "transferkit.models",
    "DataConfig": "transferkit.models",
    "FreezeSpec": "transferkit.models",
    "MultiTaskModel": "transferkit.models",
    "create_backbone": "transferkit.models",
    "fine_tune": "transferkit.api",
    "FineTuneResult": "transferkit.api",
    "Run": "transferkit.inference",
    "OnnxRun": "transferkit.inference",
    "train": "transferkit.engine",
    "evaluate_run": "transferkit.runs",
    "load_recipe": "transferkit.recipes",
    "interpolate": "transferkit.runs",
    "rank": "transferkit.select",
    "fit": "transferkit.select",
}
__all__ = [  # noqa: F822 - the names in _WHERE are imported by __getattr__ below
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
    "fit",
]
__getattr__ = lazy_exports(__name__, _WHERE)


def load(path):
    """A model ready for `predict`: a run folder's (`transferkit.inference.Run`, torch), or an
    exported `.onnx` file's (`transferkit.inference.OnnxRun`, onnxruntime, no torch needed)."""
    from transferkit.inference import is_onnx_file, load_onnx

    if is_onnx_file(path):
        return load_onnx(path)
    from transferkit.inference import load as load_run

    return load_run(path)
