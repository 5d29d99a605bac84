"""The step loop does not wait on the device between its check points (engine/tally.py).

On a GPU every host read of a tensor's value (`.item()`, `.tolist()`, `bool(t)`, `.cpu()`) and
every op whose output shape depends on the data (boolean indexing, `nonzero`) blocks the host
until the device has caught up. A CPU run cannot feel that, but it can count them: this
counter sees the reads made through Python's tensor methods and, through a dispatch mode, the
ones made inside torch's own ops.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from conftest import QUICK, records
from torch.utils._python_dispatch import TorchDispatchMode

from transferkit import train
from transferkit.engine.loop import TrainLoop
from transferkit.engine.losses import LossOptions, task_loss
from transferkit.models import TaskSpec
from transferkit.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten
# `.item()`, `bool(t)`, `float(t)`, `int(t)` all end in `_local_scalar_dense`.
_WAITING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default,
                aten.masked_select.default, aten.unique_consecutive.default}  # fmt: skip
_WAITING_METHODS = ("tolist", "cpu", "numpy")


class HostReads(TorchDispatchMode):
    """Counts host reads while active; `paused` keeps the data loader's own work out."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.counting = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        waits = func in _WAITING_OPS or _boolean_index(func, args)
        if self.counting and waits and not _in_optimizer_step():
            self.reads.append(f"{func} at {_caller()}")
        return func(*args, **(kwargs or {}))

    def method(self, name: str, original):
        def counted(tensor, *args, **kwargs):
            if self.counting:
                self.reads.append(f"Tensor.{name} at {_caller()}")
            with self.paused():  # `.tolist()` may itself read through `item`: count it once
                return original(tensor, *args, **kwargs)

        return counted

    @contextlib.contextmanager
    def paused(self):
        was, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = was

    def without_loader(self, loader):
        """The loader's batches, made (decoded, augmented, collated) with counting off."""
        with self.paused():
            iterator = iter(loader)
        while True:
            with self.paused():
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            yield batch


def _caller() -> str:
    """The innermost frame outside torch and this file: where a read comes from."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("test_host_reads.py"):
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


def _in_optimizer_step() -> bool:
    """torch's optimizers read their step count, which they keep on the host (a CPU tensor, unless
    `capturable`) precisely so that the read waits on nothing: on a CPU run it cannot be told
    from a device read, so it is left out."""
    return any("/torch/optim/" in frame.filename for frame in traceback.extract_stack())


def _boolean_index(func, args) -> bool:
    return func is aten.index.Tensor and any(
        i is not None and i.dtype == torch.bool for i in args[1]
    )


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the host reads made inside `TrainLoop.epoch`, the data loading left out."""
    counter = HostReads()
    for name in _WAITING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counter.method(name, getattr(torch.Tensor, name)))
    epoch = TrainLoop.epoch

    def counted_epoch(loop, loader, state):
        with counter:
            counter.counting = True
            try:
                return epoch(loop, counter.without_loader(loader), state)
            finally:
                counter.counting = False

    monkeypatch.setattr(TrainLoop, "epoch", counted_epoch)
    return counter


def _run(workdir, tmp_path, name: str, *overrides: str) -> list[dict]:
    recipe = load_recipe(
        ROOT / "recipes/digits_transfer.yaml",
        [*QUICK, "data.max_samples=96", "train.epochs=1", "model.weights=none",
         "train.feature_cache=forbid", *overrides],
    )  # fmt: skip
    return records(train(recipe, output=str(tmp_path / name)))


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_the_step_loop_reads_the_device_once_per_log_interval(
    workdir, monkeypatch, tmp_path, host_reads, nonfinite
):
    """Three tasks with missing labels (a classifier, a binary and a regression head), AdamW,
    `stop` and `skip`: one read per `train.log_every` steps and one at the epoch's end."""
    monkeypatch.chdir(workdir)
    steps = _run(workdir, tmp_path, nonfinite, "train.log_every=2",
                 f"train.nonfinite={nonfinite}")[-1]["step"]  # fmt: skip
    assert steps >= 4, "too few steps to tell one read per interval from one per step"
    assert 1 <= len(host_reads.reads) <= steps // 2 + 1, "\n".join(host_reads.reads)


def test_the_counter_sees_a_read_at_every_step(workdir, monkeypatch, tmp_path, host_reads):
    """The counter is not blind: logging every step reads every step."""
    monkeypatch.chdir(workdir)
    steps = _run(workdir, tmp_path, "every", "train.log_every=1")[-1]["step"]
    assert len(host_reads.reads) >= steps


def test_the_counter_sees_boolean_indexing_and_item(host_reads):
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    with host_reads:
        host_reads.counting = True
        x[mask].sum().item()
        bool(mask.any())
        x.tolist()
    assert len(host_reads.reads) == 4, host_reads.reads  # index, item, bool, tolist


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression"])
def test_a_task_loss_makes_no_host_read(host_reads, kind):
    """Masked rows are weighed out, not indexed out: no read, whatever the options."""
    task = TaskSpec(name="t", kind=kind, num_outputs=1 if kind == "binary" else 3)
    output = torch.randn(8) if kind == "binary" else torch.randn(8, 3)
    target = {"multiclass": torch.randint(0, 3, (8,)), "binary": torch.randint(0, 2, (8,)),
              "multilabel": torch.randint(0, 2, (8, 3)), "regression": torch.randn(8, 3)}[kind]  # fmt: skip
    weights = None if kind == "regression" else torch.ones(2 if kind == "binary" else 3)
    options = LossOptions(label_smoothing=0.1 if weights is not None else 0.0,
                          class_weights=weights)  # fmt: skip
    mask = torch.rand(8) > 0.5
    with host_reads:
        host_reads.counting = True
        task_loss(task, output.requires_grad_(), target, mask, options).backward()
    assert host_reads.reads == []


def test_the_running_loss_ignores_non_finite_steps_even_the_first():
    """A skipped first step (NaN) must not leave the epoch's smoothed loss NaN for good."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from transferkit.engine.tally import StepTally

    AcceleratorState._reset_state()
    tally = StepTally(Accelerator(cpu=True))
    for value in (float("nan"), 2.0, float("inf"), 4.0):
        loss = torch.tensor(value)
        tally.add(loss, {"a": loss})
    reading = tally.read(stop_asked=False)
    assert reading.running == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert reading.nonfinite == ["a", "loss"] and reading.loss == 4.0
