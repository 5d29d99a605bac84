"""Honest defaults: is `fit`'s best trial better than the plain defaults beyond the noise?

Both trials were scored on the same validation rows, so they are compared row by row (a paired
test). For each task, each labelled row has a share of the score: 1 or 0 for a right or wrong
class, the fraction of its labels right for multi-label, 1 - n e^2 / SST for R^2 (whose mean
over the rows is R^2). The lead of the best trial is the mean over the rows of its share minus
the defaults', averaged over the tasks, and its standard error is sqrt(sum over tasks of
var_t / n_t) / tasks. Rows that both get right, or both wrong, add no noise: two models that
agree on most rows differ by much less than the error of either score alone, which is all an
unpaired test (the binomial error of the defaults' score, `unpaired_margin`) can see.

The best trial replaces the defaults when its lead exceeds t standard errors, t Student's
quantile of 1 - 0.16 / k with k the finished challengers it was picked from (one standard error
against one challenger; the bar rises with k, since the best of many equal trials leads by
chance) and n - 1 degrees of freedom, n the fewest labelled validation rows of a task. Where
the rows cannot be read back (a trial's model is missing), the unpaired margin is used and the
reason says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

PASSING_TAIL = 0.16  # one-sided: one standard error against a single challenger


@dataclass(frozen=True)
class Lead:
    """The best trial's lead over the defaults on the same validation rows."""

    difference: float  # mean over tasks of the mean per-row difference
    standard_error: float
    rows: tuple[int, ...]  # labelled validation rows of each task

    def margin(self, challengers: int) -> float:
        """How far the lead must go, picked from `challengers` finished trials."""
        from scipy.stats import t

        freedom = max(min(self.rows, default=2) - 1, 1)
        return float(t.ppf(1 - PASSING_TAIL / max(challengers, 1), freedom)) * self.standard_error


def paired_lead(shares_best: dict, shares_default: dict) -> Lead:
    """The lead from each task's per-row shares (tensors over the same labelled rows)."""
    tasks = [name for name in shares_default if len(shares_default[name])]
    if not tasks:
        raise ValueError("no labelled validation rows to compare on")
    differences = [shares_best[name].double() - shares_default[name].double() for name in tasks]
    variance = sum(
        float(d.var(unbiased=True)) / len(d) if len(d) > 1 else 0.25 for d in differences
    )  # one row tells nothing of the spread: the largest variance of a share in [0, 1]
    return Lead(
        difference=sum(float(d.mean()) for d in differences) / len(tasks),
        standard_error=math.sqrt(variance) / len(tasks),
        rows=tuple(len(d) for d in differences),
    )


def row_shares(folder: Path, device: str | None = None) -> dict:
    """Each task's per-row share of `fit_score` on a trial's validation split: the trial's
    saved model (its best epoch) on the rows its recipe carved, labelled rows only."""
    import torch
    from torch.utils.data import DataLoader

    from transferkit.data import TaskImageDataset, collate, load_data
    from transferkit.inference import load, resolve_device
    from transferkit.models import probabilities
    from transferkit.rundir import RunDir

    run = load(folder)
    recipe = RunDir(folder).recipe()
    rows = load_data(recipe.data, recipe.tasks, recipe.seed, carve_validation=True).splits[
        "validation"
    ]
    dataset = TaskImageDataset(rows, list(run.tasks.values()), run.transform,
                               bad_images=recipe.data.bad_images)  # fmt: skip
    size = recipe.train.eval_batch_size or recipe.train.batch_size or 64
    target = resolve_device(device)
    model = run.model.to(target).eval()
    found: dict[str, list] = {name: [] for name in run.tasks}
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=size, collate_fn=collate):
            outputs = model(batch["image"].to(target))
            for name, task in run.tasks.items():
                mask = batch["mask"][name]
                values = probabilities(task, outputs[name]).cpu()[mask]
                found[name].append((values, batch["targets"][name][mask]))
    shares = {}
    for name, parts in found.items():
        if parts:
            values, targets = torch.cat([v for v, _ in parts]), torch.cat([t for _, t in parts])
            shares[name] = _shares(run.tasks[name].kind, values, targets)
    return shares


def _shares(kind: str, values, targets):
    """Per-row shares whose mean is the task's accuracy (classification) or R^2."""
    rows = len(targets)
    if kind == "multiclass":
        return (values.argmax(-1) == targets.long()).float()
    values, targets = values.reshape(rows, -1).float(), targets.reshape(rows, -1).float()
    if kind != "regression":  # binary, multi-label: each label right at a 0.5 threshold
        return ((values > 0.5) == (targets > 0.5)).float().mean(-1)
    spread = ((targets - targets.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return (1 - rows * (values - targets) ** 2 / spread).mean(-1)


def unpaired_margin(parts: list[tuple[float, int]], challengers: int) -> float:
    """The margin without the rows: z standard errors of the defaults' score alone,
    sqrt(sum p (1 - p) / n) / tasks from each task's (score, labelled rows), p kept within
    [0.05, 0.95], z the normal quantile of 1 - 0.16 / k."""
    from statistics import NormalDist

    variance = sum(min(max(p, 0.05), 0.95) * (1 - min(max(p, 0.05), 0.95)) / max(n, 1)
                   for p, n in parts)  # fmt: skip
    z = NormalDist().inv_cdf(1 - PASSING_TAIL / max(challengers, 1))
    return z * math.sqrt(variance) / max(len(parts), 1)
