"""Per-task validation metrics with torchmetrics, on masked rows only.

torchmetrics is imported on first use: it takes two seconds to import (scipy.signal,
matplotlib and, where installed, transformers), which commands that compute no metric skip.
The commands that always compute metrics import it up front, with the engine and the garbage
collector off (`transferkit.cli.common.ENGINE_AND_METRICS`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from transferkit.core import CLASSIFICATION_METRICS, REGRESSION_METRICS, TaskSpec, score_metric
from transferkit.models import probabilities

if TYPE_CHECKING:
    import torchmetrics as tm


def _torchmetrics():
    import torchmetrics

    return torchmetrics


def metric_names(task: TaskSpec, names: list[str] | None = None) -> list[str]:
    """The metrics computed for a task: `names` (a recipe's choice) or all of its kind's."""
    return list(
        names or (REGRESSION_METRICS if task.kind == "regression" else CLASSIFICATION_METRICS)
    )


def task_metrics(task: TaskSpec, names: list[str] | None = None) -> tm.MetricCollection:
    """accuracy, f1 (macro), auroc, ece for classification; mae, rmse, r2 for regression."""
    tm = _torchmetrics()
    if task.kind == "regression":
        available = {
            "mae": lambda: tm.MeanAbsoluteError(),
            "rmse": lambda: tm.MeanSquaredError(squared=False),
            "r2": lambda: tm.R2Score(),
        }
    else:
        kind = _classification_kind(task)
        kwargs = {"num_classes": task.num_outputs} if kind == "multiclass" else {}
        kwargs.update({"num_labels": task.num_outputs} if kind == "multilabel" else {})
        average = {} if kind == "binary" else {"average": "macro"}
        available = {
            "accuracy": lambda: tm.Accuracy(task=kind, **kwargs),
            "f1": lambda: tm.F1Score(task=kind, **kwargs, **average),
            "auroc": lambda: tm.AUROC(task=kind, **kwargs, **average),
            # torchmetrics has no multilabel ECE: every label's probability counts as one
            # binary prediction (the usual "flattened" ECE).
            "ece": lambda: (
                _flat_calibration_error()(n_bins=ECE_BINS)
                if kind == "multilabel"
                else tm.CalibrationError(task=kind, n_bins=ECE_BINS, **kwargs)
            ),
        }
    return tm.MetricCollection({n: available[n]() for n in metric_names(task, names)})


ECE_BINS = 15


def _flat_calibration_error() -> type:
    """The class `_FlatCalibrationError`, defined on first use (it subclasses torchmetrics')."""
    if "_FlatCalibrationError" not in globals():

        class _FlatCalibrationError(_torchmetrics().classification.BinaryCalibrationError):
            """Binary ECE over all labels of a multilabel task (`[N, L]` flattened)."""

            def update(self, preds, target) -> None:
                super().update(preds.reshape(-1), target.reshape(-1))

        _FlatCalibrationError.__qualname__ = "_FlatCalibrationError"  # pickled by this name
        globals()["_FlatCalibrationError"] = _FlatCalibrationError
    return globals()["_FlatCalibrationError"]


def _classification_kind(task: TaskSpec) -> str:
    """torchmetrics' `task=` for a classification task.

    torchmetrics refuses `num_labels=1`, so a one-label multilabel task is scored as binary on
    its single column (`update` flattens it); the macro average over one label is exactly that.
    """
    if task.kind == "multilabel" and task.num_outputs == 1:
        return "binary"
    return task.kind


def update_metrics(
    collection: tm.MetricCollection,
    task: TaskSpec,
    output,
    target,
    mask,
    are_probabilities: bool = False,
) -> None:
    """Add the labelled rows of a batch (`output`: logits, or probabilities when so flagged)."""
    if bool(mask.any()):
        target = target[mask]
        target = target.long() if task.kind != "regression" else target.float()
        output = output[mask]
        output = output.float() if are_probabilities else probabilities(task, output)
        if task.kind == "multilabel" and _classification_kind(task) == "binary":
            output, target = output.reshape(-1), target.reshape(-1)  # [N, 1] -> [N], binary
        collection.update(output, target)


def mean_score(values: dict[str, float], tasks: dict[str, TaskSpec], prefix: str) -> float:
    """The mean over the tasks of their accuracy or R^2 in `values` (`PREFIX/TASK/METRIC`),
    the score that ranks a multi-task epoch as a whole rather than by one task; tasks with no
    finite value (no labelled validation rows) are left out; NaN when none has one."""
    found = [
        values.get(f"{prefix}/{name}/{score_metric(task.kind)}") for name, task in tasks.items()
    ]
    finite = [v for v in found if isinstance(v, float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def compute_metrics(collection: tm.MetricCollection) -> dict[str, float]:
    """Metric values as floats (NaN when a metric is undefined, e.g. AUROC with one class)."""
    values = {}
    for name, metric in collection.items():
        try:
            values[name] = float(metric.compute())
        except (ValueError, RuntimeError):
            values[name] = float("nan")
    return values
