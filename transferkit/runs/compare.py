"""Comparing finished runs of multi-task methods: Δm% against single-task runs, and training
seconds per step (the multi-task benchmark and notebook use them)."""

from __future__ import annotations

from pathlib import Path

from transferkit.core import LOWER_IS_BETTER
from transferkit.rundir import RunDir


def delta_m(metrics: dict[str, float], single_task: dict[str, float]) -> float:
    """Mean relative change against single-task, in %, signed so that lower is better (Maninis et
    al. 2019): `100/T * sum_t (-1)^h_t (M_t - B_t) / B_t`, h_t = 1 where higher is better.

    Both arguments map a metric name such as `"digit/accuracy"` or `"ink/mae"` to its value.
    """
    if not single_task:
        raise ValueError("delta_m needs at least one single-task metric")
    total = 0.0
    for name, base in single_task.items():
        sign = 1.0 if name.rsplit("/", 1)[-1] in LOWER_IS_BETTER else -1.0
        total += sign * (metrics[name] - base) / base
    return 100.0 * total / len(single_task)


def seconds_per_step(run_dir: str | Path, skip_epochs: int = 1) -> float:
    """Training seconds per optimizer step from a run's metrics.jsonl, leaving out the first
    `skip_epochs` epochs (start-up, and a linear-probe phase that costs less)."""
    records = RunDir(run_dir).records()
    kept = records[skip_epochs:] or records
    first_step = (
        records[skip_epochs - 1]["step"] if skip_epochs and len(records) > skip_epochs else 0
    )
    steps = kept[-1]["step"] - first_step
    return sum(r["epoch_time_s"] for r in kept) / max(steps, 1)
