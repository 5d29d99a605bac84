"""The fine-tuning engine: one training run, nothing else.

    run = build_run(recipe, run_dir)   # build.py: Accelerator, model, data, optimizer, schedule
    train(recipe)                      # trainer.py: the epochs (loop.py: the steps)

What other layers use: `train`; the in-loop `evaluate` and the per-task metrics behind it (which
evaluate finished runs too); `model_outputs` and `multitask_loss`, the forward pass and the
losses of a batch; `set_up` and `cached_loaders`, which `lr-find` builds its test from.
"""

from transferkit.engine.evaluation import evaluate
from transferkit.engine.forward import model_outputs
from transferkit.engine.losses import multitask_loss
from transferkit.engine.metrics import compute_metrics, metric_names, task_metrics, update_metrics
from transferkit.engine.setup import set_up
from transferkit.engine.trainer import cached_loaders, train

__all__ = [
    "cached_loaders",
    "compute_metrics",
    "evaluate",
    "metric_names",
    "model_outputs",
    "multitask_loss",
    "set_up",
    "task_metrics",
    "train",
    "update_metrics",
]
