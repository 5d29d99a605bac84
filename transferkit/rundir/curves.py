"""`curves.png` in a run folder: the training loss and each task's validation metrics per epoch,
with the phase changes marked, drawn from metrics.jsonl alone (so any run folder can have one)."""

from __future__ import annotations

from pathlib import Path

from transferkit.rundir.folder import RunDir

_SKIPPED = ("count", "ece")  # sample counts, and calibration error (its own scale, noisy)


def _task_metrics(records: list[dict]) -> dict[str, list[str]]:
    """Per task, the validation metrics the records hold, in record order."""
    found: dict[str, list[str]] = {}
    for key in records[-1]:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "val" and parts[2] not in _SKIPPED:
            found.setdefault(parts[1], []).append(key)
    return found


def render_curves(run_dir: RunDir, monitor: str | None = None) -> Path | None:
    """Write the run's curves (None when it has no finished epoch); `monitor` is drawn bold."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone
    from matplotlib.ticker import MaxNLocator

    records = run_dir.records()
    if not records:
        return None
    tasks = _task_metrics(records)
    epochs = [r["epoch"] for r in records]
    figure = Figure(figsize=(4.2 * (1 + len(tasks)), 3.4))
    axes = figure.subplots(1, 1 + len(tasks), squeeze=False)[0]
    losses = [(r["epoch"], r["train/loss"]) for r in records if r.get("train/loss") is not None]
    axes[0].plot([e for e, _ in losses], [v for _, v in losses], marker="o", color="black")
    axes[0].set_title("training loss")
    for axis, (task, keys) in zip(axes[1:], tasks.items()):
        for key in keys:
            values = [r.get(key) for r in records]
            axis.plot(epochs, values, marker="o", label=key.rsplit("/", 1)[1],
                      linewidth=2.5 if key == monitor else 1.2)  # fmt: skip
        axis.set_title(f"{task} (validation)")
        axis.legend(fontsize=8)
    changes = [
        r["epoch"] for prev, r in zip(records, records[1:]) if r.get("phase") != prev.get("phase")
    ]
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        for epoch in changes:
            axis.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=0.8)
    figure.tight_layout()
    figure.savefig(run_dir.curves_path, dpi=90)
    return run_dir.curves_path
