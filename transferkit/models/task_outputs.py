"""What a head's output means, by task kind: probabilities or values, and the metrics that
judge it. Owned here, once, and imported by the recipe schema, the engine and inference."""

from __future__ import annotations

import torch

from transferkit.models.heads import TaskSpec

# ece: expected calibration error (15 bins), how far the predicted confidence is from accuracy.
CLASSIFICATION_METRICS = ("accuracy", "f1", "auroc", "ece")
REGRESSION_METRICS = ("mae", "rmse", "r2")
LOWER_IS_BETTER = ("mae", "rmse", "loss", "ece")  # metric names that improve downwards


def probabilities(task: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """Probabilities for classification (softmax or sigmoid of the logits), values for regression."""
    if task.kind == "multiclass":
        return output.float().softmax(-1)
    if task.kind in ("binary", "multilabel"):
        return output.float().sigmoid()
    return output.float()
