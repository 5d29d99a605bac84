"""Per-task metrics over a loader, every sample counted once across processes: what training
reports each epoch, and what `transferkit.runs` builds on to evaluate finished runs."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from transferkit.engine.forward import model_outputs
from transferkit.engine.metrics import compute_metrics, task_metrics, update_metrics
from transferkit.models import TaskSpec


@torch.no_grad()
def evaluate(
    model,
    loader,
    tasks: dict[str, TaskSpec],
    accelerator: Accelerator | None = None,
    prefix: str = "val",
    metric_names: dict[str, list[str] | None] | None = None,
) -> dict[str, float]:
    """Per-task metrics over a loader; every sample counted once across processes.

    `metric_names` picks metrics per task (a recipe's `tasks.NAME.metrics`); default: all.
    Without an accelerator, batches go to the model's device.
    """
    model.eval()
    device = next(model.parameters()).device
    metric_names = metric_names or {}
    collections = {name: task_metrics(task, metric_names.get(name)) for name, task in tasks.items()}
    counts = dict.fromkeys(tasks, 0)  # labelled rows seen: proof that each is counted once
    for batch in loader:
        if accelerator is None:
            key = "features" if "features" in batch else "image"
            batch = {**batch, key: batch[key].to(device)}
        outputs = model_outputs(model, batch)
        outputs = {k: v for k, v in outputs.items() if k in tasks}
        targets, masks = batch["targets"], batch["mask"]
        if accelerator is not None:
            outputs, targets, masks = accelerator.gather_for_metrics((outputs, targets, masks))
        for name, task in tasks.items():
            update_metrics(
                collections[name], task, outputs[name].cpu(), targets[name].cpu(), masks[name].cpu()
            )
            counts[name] += int(masks[name].sum())
    values = {}
    for name, collection in collections.items():
        for metric, value in compute_metrics(collection).items():
            values[f"{prefix}/{name}/{metric}"] = value
        values[f"{prefix}/{name}/count"] = counts[name]
    return values
