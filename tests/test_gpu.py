"""On one CUDA GPU (`make test-gpu`; without one every test here is skipped): mixed precision
with the loss scaler, compile with channels_last, resume with everything back on the GPU, the
balancing methods and their state, and eval and predict against the CPU.

Runs are short (digits, `timm:test_resnet`, 32 px) and go through `transferkit.engine.train`
as the CLI's do. What happens inside a run is seen through `spy`, which wraps the trainer's
`build_run`, `load_checkpoint` and `enter_phase` without changing them.

Tolerances: cuDNN runs deterministic and TF32 is off here (`_exact_cuda`), so that the GPU is
compared with itself (resume) and with the CPU (eval, predict, balancers) at float32 rounding
rather than at TF32's 1e-3. A few kernels (global average pooling's backward among them) still
use atomic adds, whose order varies from run to run, so GPU results are compared within a
tolerance, never bit for bit as the CPU tests do.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import FULL_LABELS, advance_balancer, balancer_tensors, epoch_end_weights, records

import transferkit
import transferkit.engine.trainer as trainer_module
from transferkit.balancing import METHODS, Balancer
from transferkit.engine import train
from transferkit.recipes import load_recipe, parse_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU: run `make test-gpu` on one"
    ),
]

DEVICE = "cuda"
TASKS = ["a", "b", "c"]
STATEFUL = [n for n, m in METHODS.items() if m.stateful]
GRADIENT = [n for n, m in METHODS.items() if m.kind == "gradient"]


@pytest.fixture(autouse=True)
def _exact_cuda():
    """Deterministic cuDNN algorithms, and float32 matmuls and convolutions without TF32."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.deterministic, cudnn.benchmark = True, False
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def _recipe(name: str, method: str = "sum", **train_options) -> dict:
    """Two fully labelled tasks on the transfer digits; 6 steps an epoch; SGD with momentum."""
    return {
        "name": name,
        "seed": 1,
        "model": {"backbone": "timm:test_resnet"},
        "tasks": {"digit": {"kind": "multiclass"},
                  "parity": {"kind": "binary", "classes": ["even", "odd"]}},
        "data": {"source": "manifest", "path": FULL_LABELS, "val_split": None, "image_size": 32,
                 "augment": "none", "max_samples": 96, "num_workers": 0},
        "schedule": {"phases": [{"from_epoch": 0, "freeze": "up_to:layer1"}]},
        "train": {"epochs": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                  "weight_decay": 0.0, "scheduler": "constant", "keep_checkpoints": 40,
                  **train_options},
        "multitask": {"method": method},
    }  # fmt: skip


def _train(workdir: Path, recipe: dict) -> Path:
    output = workdir / "gpu" / recipe["name"]
    shutil.rmtree(output, ignore_errors=True)
    return train(parse_recipe(recipe), output=str(output))


def _cpu(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def placement(run) -> dict[str, dict[str, str]]:
    """The device type of every tensor of a run: model, optimizer state, balancer state."""
    model = run.accelerator.unwrap_model(run.model)
    names = {id(p): name for name, p in model.named_parameters()}
    if run.balancer is not None:
        names.update(
            {id(p): f"balancer.{i}" for i, p in enumerate(run.balancer.learnable_parameters())}
        )
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
    return {
        "model": {k: v.device.type for k, v in model.state_dict().items()},
        "optimizer": {
            f"{names.get(id(param), '?')}.{key}": value.device.type
            for param, state in optimizer.state.items()
            for key, value in state.items()
            if isinstance(value, torch.Tensor)
        },
        "balancer": {}
        if run.balancer is None
        else {k: v.device.type for k, v in balancer_tensors(run.balancer).items()},
    }


@pytest.fixture
def spy(monkeypatch):
    """Each `train` call's RunSetup and the weights it started from; the placement of every
    tensor right after a checkpoint is loaded; the module each phase's steps ran through."""
    seen = SimpleNamespace(runs=[], starts=[], loaded=[], phases=[])
    build_run = trainer_module.build_run
    load_checkpoint = trainer_module.load_checkpoint
    enter_phase = trainer_module.enter_phase

    def spy_build_run(*args, **kwargs):
        run = build_run(*args, **kwargs)
        seen.runs.append(run)
        seen.starts.append(_cpu(run.accelerator.unwrap_model(run.model).state_dict()))
        return run

    def spy_load_checkpoint(accelerator, run_dir):
        result = load_checkpoint(accelerator, run_dir)
        seen.loaded.append(placement(seen.runs[-1]))
        return result

    def spy_enter_phase(run, loop, phase, feature_dir):
        loaders = enter_phase(run, loop, phase, feature_dir)
        seen.phases.append((phase, loop.forward_module))
        return loaders

    monkeypatch.setattr(trainer_module, "build_run", spy_build_run)
    monkeypatch.setattr(trainer_module, "load_checkpoint", spy_load_checkpoint)
    monkeypatch.setattr(trainer_module, "enter_phase", spy_enter_phase)
    return seen


def _assert_trained(run_dir: Path, method: str) -> None:
    """Finite losses, validation metrics and balancer weights in every epoch's record."""
    log = records(run_dir)
    assert len(log) == 2
    for record in log:
        assert math.isfinite(record["train/loss"]) and record["skipped_steps"] == 0, record
        for task in ("digit", "parity"):
            assert 0.0 <= record[f"val/{task}/accuracy"] <= 1.0, record
            if method != "sum":
                assert math.isfinite(record[f"mtl/weight/{task}"]), record
        assert record["peak_memory_mb"] > 0  # the CUDA allocator's peak


# ---------------------------------------------------------------------------------------------
# Mixed precision on one GPU


@pytest.fixture(scope="module")
def fp32_runs() -> dict:
    """fp32 runs by method, trained once: (final weights, start weights)."""
    return {}


def _backbone_update(final: dict, start: dict) -> torch.Tensor:
    """How the trainable shared weights moved (layer2-layer4: the recipe freezes up to layer1)."""
    keys = [k for k in final if k.startswith("backbone.model.layer") and k.endswith("weight")
            and not k.startswith("backbone.model.layer1")]  # fmt: skip
    assert keys
    return torch.cat([(final[k].float() - start[k].float()).flatten() for k in keys])


@pytest.mark.parametrize(
    ("precision", "method"),
    [("bf16", "sum"), ("bf16", "upgrad"), ("fp16", "upgrad"), ("fp16", "nash_mtl")],
)
def test_mixed_precision_trains_on_one_gpu(
    workdir, labelled, spy, monkeypatch, fp32_runs, precision, method
):
    """bf16 and fp16 train with finite losses and record their metrics. With fp16 the gradient
    scaler is in play: the Jacobian path scales each task's gradient by the scaler's scale and
    hands the scaled direction to it, so the update must match fp32's (not be 2^16 times off),
    and the scale must only fall, by halves, on an overflow."""
    monkeypatch.chdir(workdir)
    recipe = _recipe(f"{precision}_{method}", method, mixed_precision=precision, checkpoint_every=2)
    run_dir = _train(workdir, recipe)
    run, start = spy.runs[-1], spy.starts[-1]
    accelerator = run.accelerator
    assert accelerator.device.type == DEVICE and accelerator.mixed_precision == precision
    assert (accelerator.scaler is not None) == (precision == "fp16")
    assert next(accelerator.unwrap_model(run.model).parameters()).device.type == DEVICE
    _assert_trained(run_dir, method)

    # The loss scale of every kept checkpoint (Accelerate saves the scaler as scaler.pt).
    checkpoints = transferkit.RunDir(run_dir).checkpoints()
    assert len(checkpoints) == 8  # every 2 of 12 steps, and the 2 epoch ends
    scales = [torch.load(c / "scaler.pt", weights_only=True)["scale"]
              for c in checkpoints if (c / "scaler.pt").is_file()]  # fmt: skip
    if precision == "bf16":
        assert scales == []  # no scaler: bf16 has fp32's range
    else:
        assert len(scales) == len(checkpoints)
        # 2^16 at the start, halved at each overflow (that step skipped), grown only after
        # 2000 clean steps: within 12 steps it can only fall, by powers of two.
        assert all(0 < s <= 2.0**16 and math.log2(s).is_integer() for s in scales), scales
        assert scales == sorted(scales, reverse=True), scales
        assert math.log2(2.0**16 / scales[-1]) <= 3, scales  # at most 3 of 12 steps skipped

    # The same run in fp32, from the same initial weights: the update agrees.
    if method not in fp32_runs:
        reference = _train(workdir, _recipe(f"fp32_{method}", method))
        fp32_runs[method] = (epoch_end_weights(reference), spy.starts[-1])
    final32, start32 = fp32_runs[method]
    assert all(torch.equal(start[k], start32[k]) for k in start32)
    update = _backbone_update(epoch_end_weights(run_dir), start)
    reference_update = _backbone_update(final32, start32)
    ratio = float(update.norm() / reference_update.norm())
    cosine = float(F.cosine_similarity(update, reference_update, dim=0))
    assert 0.5 < ratio < 1.5 and cosine > 0.9, (ratio, cosine)


# ---------------------------------------------------------------------------------------------
# torch.compile with channels_last


def test_compile_with_channels_last_trains_on_the_gpu(workdir, labelled, spy, monkeypatch):
    """Inductor-compiled steps on channels_last weights, across a phase change that unfreezes
    layer2 and layer3: compiled again for the new phase (a graph traced while they were frozen
    would leave them untrained, pytorch #139476), and the losses of eager mode."""
    monkeypatch.chdir(workdir)
    phases = [{"from_epoch": 0, "freeze": "up_to:layer3"}, {"from_epoch": 1, "freeze": "up_to:layer1"}]  # fmt: skip
    recipe = _recipe("compiled", compile=True, channels_last=True, feature_cache="forbid")
    recipe["schedule"]["phases"] = phases
    compiled = _train(workdir, recipe)
    model = spy.runs[-1].accelerator.unwrap_model(spy.runs[-1].model)
    convolutions = [p for p in model.parameters() if p.ndim == 4]
    assert convolutions and all(
        p.device.type == DEVICE and p.is_contiguous(memory_format=torch.channels_last)
        for p in convolutions
    )
    assert [phase for phase, _ in spy.phases] == [0, 1]
    modules = [module for _, module in spy.phases]
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in modules)
    assert modules[0] is not modules[1]  # compiled again at the phase change
    _assert_trained(compiled, "sum")

    before, after = epoch_end_weights(compiled, 0), epoch_end_weights(compiled, 1)
    unfrozen = [k for k in after if k.startswith(("backbone.model.layer2", "backbone.model.layer3"))
                and k.endswith("weight")]  # fmt: skip
    assert unfrozen and all(not torch.equal(before[k], after[k]) for k in unfrozen)
    frozen = [k for k in after if k.startswith("backbone.model.layer1")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)

    recipe.update(name="eager")
    recipe["train"]["compile"] = False
    eager = _train(workdir, recipe)
    for a, b in zip(records(eager), records(compiled)):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Resume on the GPU


@pytest.mark.parametrize("method", ["db_mtl", "famo"])
def test_resume_on_the_gpu_continues_with_everything_on_it(
    workdir, labelled, spy, monkeypatch, method
):
    """Train 3 epochs with a checkpoint at each of the 18 steps; resume a copy from step 9 (mid
    epoch 1). Right after loading, the model, every optimizer state tensor (SGD's momentum) and
    the balancer's state (DB-MTL's gradient average; FAMO's last losses and Adam) are where the
    run that never stopped had them: on the GPU (Adam's step counter on the CPU, as torch keeps
    it). The final weights agree within 1e-5: deterministic cuDNN, but atomic adds (see the
    module docstring); a lost momentum or balancer state moves them by about 1e-3."""
    monkeypatch.chdir(workdir)
    recipe = _recipe(f"resume_{method}", method, epochs=3, checkpoint_every=1)
    full = _train(workdir, recipe)
    never_stopped = placement(spy.runs[-1])
    crashed = workdir / "gpu" / f"resume_{method}_crashed"
    shutil.rmtree(crashed, ignore_errors=True)
    shutil.copytree(full, crashed)
    for checkpoint in (crashed / "checkpoints").iterdir():
        if int(checkpoint.name.split("_")[1]) > 9:
            shutil.rmtree(checkpoint)
    (crashed / "model.safetensors").unlink()
    train(load_recipe(crashed / "recipe.yaml"), resume=str(crashed))

    (loaded,) = spy.loaded
    assert set(loaded["model"].values()) == {DEVICE}
    assert loaded["optimizer"] and set(loaded["optimizer"].values()) == {DEVICE}
    assert loaded["balancer"] == never_stopped["balancer"]
    on_device = {d for path, d in loaded["balancer"].items() if not path.endswith(".step")}
    assert on_device == {DEVICE}, loaded["balancer"]

    a, b = epoch_end_weights(full), epoch_end_weights(crashed)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= 1e-5, worst
    assert [r["epoch"] for r in records(crashed)] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Balancing methods and their state on the GPU


def _roundtrip(balancer: Balancer) -> dict:
    """The state as Accelerate loads a registered object's: saved, then loaded on the CPU."""
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def _where(balancer: Balancer) -> dict[str, str]:
    return {k: v.device.type for k, v in balancer_tensors(balancer).items()}


@pytest.mark.parametrize("name", STATEFUL)
def test_balancer_state_reloads_and_moves_onto_the_gpu(name):
    """Every stateful method: state reloaded into a balancer moved to the GPU (as the trainer
    moves it) is where a balancer that stayed on the GPU has it, and continues the
    same; a balancer moved to the GPU mid-run continues as if it had been there all along."""
    on_gpu = Balancer(name, TASKS).to(DEVICE)
    for i in range(5):
        advance_balancer(on_gpu, i, DEVICE)
    reloaded = Balancer(name, TASKS)
    reloaded.to(DEVICE)
    reloaded.load_state_dict(_roundtrip(on_gpu))
    moved = Balancer(name, TASKS)
    for i in range(5):
        advance_balancer(moved, i)  # on the CPU
    moved.to(DEVICE)
    assert _where(reloaded) == _where(on_gpu) and _where(moved) == _where(on_gpu)
    for i in range(5, 8):
        expected = advance_balancer(on_gpu, i, DEVICE)
        assert expected.device.type == DEVICE
        got = advance_balancer(reloaded, i, DEVICE)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7), (name, i)
        # Steps 0-4 ran on the CPU: float32 rounding apart, not bit for bit.
        got = advance_balancer(moved, i, DEVICE)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (name, i)


@pytest.mark.parametrize("name", GRADIENT)
def test_every_gradient_method_aggregates_on_the_gpu(name):
    """CUDA Jacobian and masks, every task present or one absent (stateful torchjd methods
    fall back to the mean then): a finite direction on the GPU, per-task weights logged on the
    CPU, and the CPU's direction (random methods: the same draws on two GPU balancers)."""
    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(3, 40, generator=generator)
    losses = torch.rand(3, generator=generator) + 0.2
    for present in (torch.tensor([True, True, True]), torch.tensor([True, False, True])):
        gpu = Balancer(name, TASKS).to(DEVICE)
        args = (jacobian.to(DEVICE), losses.to(DEVICE), present.to(DEVICE), 0, 1)
        direction = gpu.aggregate(*args)
        assert direction.device.type == DEVICE and bool(torch.isfinite(direction).all())
        assert gpu.weights_dict().keys() <= {"a", "c"} | ({"b"} if present.all() else set())
        if METHODS[name].randomized:
            other = Balancer(name, TASKS).to(DEVICE).aggregate(*args)
            assert torch.equal(direction, other)
        else:
            cpu = Balancer(name, TASKS).aggregate(jacobian, losses, present, 0, 1)
            assert torch.allclose(direction.cpu(), cpu, rtol=1e-4, atol=1e-5), name


# ---------------------------------------------------------------------------------------------
# Eval and predict on the GPU


@pytest.fixture(scope="module")
def trained(workdir, labelled) -> Path:
    """A short finished run (trained on the GPU) to evaluate and predict with."""
    import os

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return _train(workdir, _recipe("to_evaluate"))
    finally:
        os.chdir(cwd)


def test_evaluate_run_on_the_gpu_matches_the_cpu(trained, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    on_gpu = transferkit.evaluate_run(trained, device=DEVICE)
    on_cpu = transferkit.evaluate_run(trained, device="cpu")
    assert on_gpu.keys() == on_cpu.keys() and "validation/digit/accuracy" in on_gpu
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_predict_on_the_gpu_matches_the_cpu(trained, workdir):
    run = transferkit.load(trained)
    images = sorted((workdir / "data/digits/transfer/images").iterdir())[:40]
    on_gpu = run.predict(images, device=DEVICE, batch_size=16)
    assert next(run.model.parameters()).device.type == DEVICE
    on_cpu = run.predict(images, device="cpu", batch_size=16)
    assert len(on_gpu) == len(on_cpu) == 40
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert gpu.keys() == cpu.keys()
        for task in ("digit", "parity"):
            assert gpu[task]["label"] == cpu[task]["label"]
            assert gpu[task]["score"] == pytest.approx(cpu[task]["score"], abs=2e-4)


# ---------------------------------------------------------------------------------------------
# The step loop never waits on the GPU between its check points (engine/tally.py)


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_the_steps_between_check_points_never_synchronize(workdir, labelled, monkeypatch,
                                                          nonfinite):  # fmt: skip
    """CUDA's sync debug mode turns any synchronizing call (a read, a blocking copy, a
    data-dependent shape) into an error; it is on for the steps and off for the data loader's
    work and for the check points' one read. The CPU test (test_host_reads.py) counts the same
    reads; this one also catches the blocking copies a CPU cannot see."""
    from transferkit.engine.loop import TrainLoop
    from transferkit.engine.tally import StepTally

    epoch, read = TrainLoop.epoch, StepTally.read

    def strict_batches(loader):
        iterator = iter(loader)
        while True:
            torch.cuda.set_sync_debug_mode(0)
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                torch.cuda.set_sync_debug_mode("error")
            yield batch

    def strict_epoch(loop, loader, state):
        try:
            return epoch(loop, strict_batches(loader), state)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def allowed_read(tally, *args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return read(tally, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(TrainLoop, "epoch", strict_epoch)
    monkeypatch.setattr(StepTally, "read", allowed_read)
    monkeypatch.chdir(workdir)
    recipe = _recipe(f"strict_{nonfinite}", nonfinite=nonfinite, log_every=3,
                     feature_cache="forbid")  # fmt: skip
    recipe["train"]["optimizer"] = "adamw"
    log = records(_train(workdir, recipe))
    assert math.isfinite(log[-1]["train/loss"]) and log[-1]["step"] >= 3
