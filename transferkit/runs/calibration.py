"""`transferkit calibrate RUN_DIR`: temperature scaling of every classification task.

One temperature T per task (Guo et al. 2017): the logits are divided by T, which changes the
confidence of the predictions and never the predicted class (accuracy and F1 stay the same).
T is fitted on the validation split by minimizing the negative log-likelihood with LBFGS (on
log T, so T stays positive), over the labelled rows only; the temperatures go into the run's
model.json, where `transferkit.load`, `predict` and `eval` pick them up. The logits are those
`predict` divides: averaged over the recipe's test-time views (`data.tta`) unless `tta` says
otherwise, so a run that predicts with multi-crop is calibrated on multi-crop logits. A
reliability diagram (accuracy per confidence bin, before and after) is written as a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from transferkit.data import TaskImageDataset, collate
from transferkit.engine import compute_metrics, task_metrics, update_metrics
from transferkit.errors import UserError
from transferkit.inference import AdjustedModel, load, resolve_device
from transferkit.models import TaskSpec, probabilities
from transferkit.rundir import RunDir
from transferkit.runs.evaluate import check_tasks, eval_split


def nll(task: TaskSpec, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean negative log-likelihood of labelled rows' logits."""
    if task.kind == "multiclass":
        return F.cross_entropy(logits, target.long())
    return F.binary_cross_entropy_with_logits(logits, target.float())


def fit_temperature(task: TaskSpec, logits: torch.Tensor, target: torch.Tensor) -> float:
    """The temperature that minimizes the NLL of `logits / T` (LBFGS on log T)."""
    logits, target = logits.detach().double(), target.detach()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(task, logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        raise UserError(f"task {task.name!r}: the temperature fit diverged; check its labels")
    return temperature


@torch.no_grad()
def _collect_logits(
    run, rows, device, batch_size: int, views=()
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per classification task: (logits, targets) of the labelled rows, on the CPU; logits
    averaged over the test-time `views`, before any temperature."""
    tasks = {n: t for n, t in run.tasks.items() if t.kind != "regression"}
    dataset = TaskImageDataset(rows, list(run.tasks.values()), run.transform)
    model = AdjustedModel(run.model, run.tasks, views).to(device).eval()
    found: dict[str, list] = {name: [] for name in tasks}
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        outputs = model(batch["image"].to(device))
        for name in tasks:
            mask = batch["mask"][name]
            found[name].append((outputs[name].float().cpu()[mask], batch["targets"][name][mask]))
    return {
        name: (torch.cat([o for o, _ in parts]), torch.cat([t for _, t in parts]))
        for name, parts in found.items()
    }


def ece(task: TaskSpec, logits: torch.Tensor, target: torch.Tensor) -> float:
    """Expected calibration error of logits (the metric `eval` reports as `ece`)."""
    collection = task_metrics(task, ["ece"])
    update_metrics(collection, task, logits, target, torch.ones(len(target), dtype=torch.bool))
    return compute_metrics(collection)["ece"]


def calibrate_run(
    run_dir: str | Path | RunDir,
    split: str = "validation",
    device: str | None = None,
    batch_size: int = 64,
    tta: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Fit, store and plot a temperature per classification task; returns, per task, the
    temperature and the NLL and ECE before and after. `tta`: the test-time views to fit on
    (default: the recipe's `data.tta`, the views `predict` and `eval` use)."""
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run = load(folder)
    views = run.views(tta)
    if all(t.kind == "regression" for t in run.tasks.values()):
        raise UserError(f"{folder.path}: every task is a regression task; nothing to calibrate")
    _, rows, specs = eval_split(folder, split)
    check_tasks(folder.path, run.tasks, specs)
    report, curves = {}, {}
    for name, (logits, target) in _collect_logits(
        run, rows, resolve_device(device), batch_size, views
    ).items():
        task = run.tasks[name]
        if len(target) == 0:
            raise UserError(f"task {name!r}: no labelled row in split {split!r} to calibrate on")
        t = fit_temperature(task, logits, target)
        report[name] = {
            "temperature": round(t, 6),
            "nll_before": float(nll(task, logits, target)),
            "nll_after": float(nll(task, logits / t, target)),
            "ece_before": ece(task, logits, target),
            "ece_after": ece(task, logits / t, target),
            "rows": len(target),
        }
        curves[name] = (task, logits, target, t)
    temperatures = {n: r["temperature"] for n, r in report.items()}
    calibration = {"split": split, "views": views, "tasks": report}
    folder.update_info(temperatures=temperatures, calibration=calibration)
    _reliability_diagram(curves, folder.reliability_path)
    return report


def _bins(task: TaskSpec, logits: torch.Tensor, target: torch.Tensor, bins: int):
    """Per confidence bin: mean confidence, accuracy, count (top class; each label of
    multilabel tasks, and the predicted class of binary ones)."""
    p = probabilities(task, logits)
    if task.kind == "multiclass":
        confidence, predicted = p.max(-1)
        correct = predicted == target.long()
    else:
        p, target = p.reshape(-1), target.reshape(-1)
        confidence = torch.where(p >= 0.5, p, 1 - p)
        correct = (p >= 0.5) == (target >= 0.5)
    edges = torch.linspace(0, 1, bins + 1)
    index = torch.bucketize(confidence, edges[1:-1])
    rows = []
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            rows.append((float(confidence[chosen].mean()), float(correct[chosen].float().mean()),
                         int(chosen.sum())))  # fmt: skip
    return rows


def _reliability_diagram(curves: dict, path: Path, bins: int = 10) -> None:
    """One panel per task: accuracy against confidence per bin, before and after scaling."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    for axis, (name, (task, logits, target, t)) in zip(axes[0], curves.items()):
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
        for label, scaled, marker in (("before", logits, "o"), (f"T = {t:.2f}", logits / t, "s")):
            rows = _bins(task, scaled, target, bins)
            axis.plot([r[0] for r in rows], [r[1] for r in rows], marker=marker,
                      label=f"{label} (ECE {ece(task, scaled, target):.3f})")  # fmt: skip
        axis.set(title=name, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        axis.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
