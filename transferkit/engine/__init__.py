"""The fine-tuning engine: one training run, nothing else.

    train(recipe)                                # trainer.py: the folder and the epochs
    run = build_run(recipe, make_accelerator(recipe))   # build.py: everything, nothing written

Read in this order: `trainer.py` (the epochs), `loop.py` (the steps), `strategies.py` (how task
losses become gradients), `build.py` (what a run is made of), then the helpers it names.

What other layers use: `train`; `build_run` and `cached_loaders`, from which `lr-find` builds
its test; the in-loop `evaluate` and the per-task metrics behind it (finished runs are
evaluated with them too); `model_outputs` and `multitask_loss`, a batch's forward pass and
losses.
"""

from transferkit.engine.accelerator import make_accelerator
from transferkit.engine.build import RunSetup, build_run
from transferkit.engine.evaluation import evaluate
from transferkit.engine.forward import model_outputs
from transferkit.engine.losses import multitask_loss
from transferkit.engine.metrics import (
    compute_metrics,
    mean_score,
    metric_names,
    task_metrics,
    update_metrics,
)
from transferkit.engine.phases import cached_loaders
from transferkit.engine.state import TrainerState
from transferkit.engine.trainer import train

__all__ = [
    "RunSetup",
    "TrainerState",
    "build_run",
    "cached_loaders",
    "compute_metrics",
    "evaluate",
    "make_accelerator",
    "mean_score",
    "metric_names",
    "model_outputs",
    "multitask_loss",
    "task_metrics",
    "train",
    "update_metrics",
]
