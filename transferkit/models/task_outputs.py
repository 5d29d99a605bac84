"""What a head's output means, by task kind: probabilities or values, and the metrics that
judge it. Owned here, once, and imported by the recipe schema, the engine and inference."""

from __future__ import annotations

import torch

from transferkit.core import (  # noqa: F401 - the metric names, re-exported
    CLASSIFICATION_METRICS,
    LOWER_IS_BETTER,
    REGRESSION_METRICS,
    TaskSpec,
)


def probabilities(task: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """Probabilities for classification (softmax or sigmoid of the logits), values for regression."""
    if task.kind == "multiclass":
        return output.float().softmax(-1)
    if task.kind in ("binary", "multilabel"):
        return output.float().sigmoid()
    return output.float()
