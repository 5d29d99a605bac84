"""The step loop with each strategy: one path, and a skipped step leaves nothing behind."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from transferkit.balancing import Balancer
from transferkit.engine import TrainerState
from transferkit.engine.loop import TrainLoop
from transferkit.engine.strategies import (
    CombinedLoss,
    JacobianAggregation,
    PlainSum,
    build_strategy,
)
from transferkit.errors import UserError
from transferkit.models import MultiTaskModel, TaskSpec, create_backbone
from transferkit.recipes import TrainSection

TASKS = [TaskSpec("a", "multiclass", 3), TaskSpec("b", "regression", 1)]


def _batch(seed: int, nan: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    if nan:
        images[0] = float("nan")
    return {
        "image": images,
        "targets": {
            "a": torch.randint(0, 3, (4,), generator=generator),
            "b": torch.randn(4, generator=generator),
        },
        "mask": {"a": torch.ones(4, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)},
        "index": torch.arange(4),
    }


def _train(
    batches: list[dict], method: str, model: MultiTaskModel, fused: bool = False
) -> dict[str, torch.Tensor]:
    """One epoch over `batches` with accumulation 2 and nonfinite: skip; the weights after.
    `fused`: an optimizer that skips on the device (no read), else the loop skips on the host."""
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    balancer = Balancer(method, model.output_keys) if method != "sum" else None
    tasks = {t.name: t for t in TASKS}
    strategy = build_strategy(accelerator, model, {"a": 1.0, "b": 1.0}, balancer, tasks=tasks)
    cfg = TrainSection(nonfinite="skip", log_every=1)
    loop = TrainLoop(accelerator=accelerator, model=model, optimizer=optimizer,
                     lr_scheduler=scheduler, tasks=tasks, cfg=cfg, seed=0, strategy=strategy)  # fmt: skip
    assert loop.skips_on_device == (fused and method == "sum")
    state = TrainerState()
    loop.epoch(batches, state)
    assert state.skipped_steps == sum(any(torch.isnan(b["image"]).any() for b in w)
                                      for w in zip(batches[::2], batches[1::2]))  # fmt: skip
    return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


@pytest.fixture(scope="module")
def model() -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(create_backbone("timm:test_resnet", None), TASKS)


def test_build_strategy_picks_by_method_kind(model):
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    assert type(build_strategy(accelerator, model, {}, None)) is PlainSum
    uw = Balancer("uw", model.output_keys)
    assert type(build_strategy(accelerator, model, {}, uw)) is CombinedLoss
    upgrad = Balancer("upgrad", model.output_keys)
    assert type(build_strategy(accelerator, model, {}, upgrad)) is JacobianAggregation


@pytest.mark.parametrize("nan_first", [False, True], ids=["NaN ends the window", "NaN opens it"])
@pytest.mark.parametrize(
    "method,fused", [("sum", False), ("sum", True), ("uw", False), ("upgrad", False),
                     ("mgda", True)],
)  # fmt: skip
def test_a_skipped_step_leaves_nothing_for_the_next_update(model, method, fused, nan_first):
    """Accumulation window 1 = [finite, NaN] or [NaN, finite]: skipped whole. The update of
    window 2 must equal an update from window 2 alone; under a gradient method the Jacobian of
    the first micro-batch used to stay in the window and leak into the next step, and a NaN
    opening the window used to leave its second micro-batch's gradients to be stepped."""
    finite, poisoned, third, fourth = _batch(1), _batch(2, nan=True), _batch(3), _batch(4)
    window = [poisoned, finite] if nan_first else [finite, poisoned]
    with_skip = _train([*window, third, fourth], method, model, fused)
    alone = _train([third, fourth], method, model, fused)
    moved = [k for k in alone if not torch.equal(alone[k], model.state_dict()[k].to(alone[k]))]
    assert moved, "the step changed nothing: the test would prove nothing"
    for key in alone:
        if alone[key].is_floating_point() and "running" not in key:
            torch.testing.assert_close(with_skip[key], alone[key], rtol=1e-5, atol=1e-6)


def _loop(model, optimizer, nonfinite: str, method: str = "sum"):
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    balancer = Balancer(method, model.output_keys) if method != "sum" else None
    tasks = {t.name: t for t in TASKS}
    strategy = build_strategy(accelerator, model, {"a": 1.0, "b": 1.0}, balancer, tasks=tasks)
    return TrainLoop(accelerator=accelerator, model=model, optimizer=optimizer,
                     lr_scheduler=scheduler, tasks=tasks, cfg=TrainSection(nonfinite=nonfinite),
                     seed=0, strategy=strategy)  # fmt: skip


def test_a_fused_optimizer_resumed_from_an_unfused_checkpoint_skips_on_the_host(model):
    """A resumed optimizer takes its groups' settings (`fused` among them) from the checkpoint:
    one saved unfused must not be handed a found_inf flag (torch's unfused step refuses it)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    optimizer.load_state_dict(torch.optim.AdamW(model.parameters(), lr=0.1).state_dict())
    loop = _loop(model, optimizer, "skip")
    assert not loop.skips_on_device and loop.reads_every_step
    state = TrainerState()
    loop.epoch([_batch(1), _batch(2, nan=True)], state)
    assert state.skipped_steps == 1 and state.step == 1


def test_stop_with_a_balancer_stops_at_the_step_before_the_balancer_sees_it(model):
    """A balancer reads every step anyway; under `stop` it must not be fed a non-finite loss
    (UPGrad's solver would fail with its own error) but stop the run with the clear one."""
    model = copy.deepcopy(model)
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), "stop", "upgrad")
    assert loop.reads_every_step
    with pytest.raises(UserError, match=r"non-finite loss for task .* at epoch 0, step 2"):
        loop.epoch([_batch(1), _batch(2, nan=True)], TrainerState())
