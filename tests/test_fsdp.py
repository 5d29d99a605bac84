"""FSDP through Accelerate's plugin, with groups frozen and unfrozen by phases after wrapping.

Accelerate 1.15 sets up FSDP only on GPUs: on a CPU, `ACCELERATE_USE_FSDP=true` silently
leaves DDP in place, so transferkit refuses it (`test_fsdp_asked_on_a_cpu_is_one_clear_error`).
PyTorch's FSDP itself runs on CPU with gloo: the CPU tests launch through
`tests/fsdp_on_cpu.py`, which sets the state that Accelerate sets on GPUs; from there on it is
Accelerate's and transferkit's own code. With 2 GPUs the same test runs without that launcher
(`gpu` marker). The FSDP settings come from examples/accelerate/fsdp.yaml, through
Accelerate's launcher code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from conftest import free_port, records
from test_accelerate_configs import EXAMPLES, launch_env

from transferkit.balancing import Balancer
from transferkit.engine.accelerator import check_fsdp, init_optimizer_state
from transferkit.errors import UserError

TESTS = Path(__file__).resolve().parent

# Phase 0 trains the heads on a frozen backbone (a phase the feature cache would take, which
# FSDP must not), phase 1 unfreezes blocks 3-5 inside the wrapped model. Weight decay on SGD
# checks that the optimizer state made up front changes no update.
RECIPE = """
name: fsdp
seed: 0
model: {backbone: "timm:test_vit", kwargs: {img_size: 32}}
tasks: {digit: {kind: multiclass}}
data: {source: manifest, path: data/digits/source/manifest.csv, val_split: null, image_size: 32,
       augment: none, max_samples: 128, num_workers: 0}
schedule:
  phases:
    - {from_epoch: 0, freeze: all}
    - {from_epoch: 1, freeze: "up_to:blocks.2", lr_mult: {heads: 0.5}}
train: {epochs: 2, batch_size: BATCH, optimizer: sgd, lr: 0.05, momentum: 0.9,
        weight_decay: 0.01, scheduler: constant}
"""
FROZEN = ("cls_token", "pos_embed", "patch_embed.", "blocks.0.", "blocks.1.", "blocks.2.")


def _fake_accelerator(plugin=None, processes: int = 2, kind=DistributedType.FSDP):
    return SimpleNamespace(distributed_type=kind, num_processes=processes,
                           device=torch.device("cpu"), state=SimpleNamespace(fsdp_plugin=plugin))  # fmt: skip


def test_check_fsdp_refuses_what_cannot_train(monkeypatch):
    def plugin(**kw):
        return FullyShardedDataParallelPlugin(sync_module_states=False, **kw)

    v2 = plugin(fsdp_version=2)
    check_fsdp(_fake_accelerator(v2), None)
    check_fsdp(_fake_accelerator(v2), Balancer("dwa", ["a", "b"]))
    check_fsdp(_fake_accelerator(plugin(use_orig_params=True)), None)  # FSDP1, full state dict
    with pytest.raises(UserError, match="use_orig_params"):
        check_fsdp(_fake_accelerator(plugin(use_orig_params=False)), None)
    # Wrapper modules in parameter names: the freeze schedule could not find its groups.
    wrapped = plugin(use_orig_params=True, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    with pytest.raises(UserError, match="NO_WRAP"):
        check_fsdp(_fake_accelerator(wrapped), None)
    with pytest.raises(UserError, match="fsdp_activation_checkpointing"):
        check_fsdp(_fake_accelerator(plugin(fsdp_version=2, activation_checkpointing=True)), None)
    sharded = plugin(use_orig_params=True, state_dict_type="SHARDED_STATE_DICT")
    with pytest.raises(UserError, match="FULL_STATE_DICT"):
        check_fsdp(_fake_accelerator(sharded), None)
    for method in ("upgrad", "uw", "famo"):  # per-task gradients, loss weights, extra forward
        with pytest.raises(UserError, match=f"multitask.method: {method} does not run under FSDP"):
            check_fsdp(_fake_accelerator(v2), Balancer(method, ["a", "b"]))
    # Asked for, but not set up (Accelerate on a CPU): an error with several processes.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="would train with DDP instead"):
        check_fsdp(_fake_accelerator(processes=2, kind=DistributedType.MULTI_CPU), None)
    check_fsdp(_fake_accelerator(processes=1, kind=DistributedType.NO), None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_fsdp(_fake_accelerator(processes=2, kind=DistributedType.MULTI_CPU), None)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_state_made_up_front_changes_no_update(kind):
    """Every parameter gets zero state before training; each update is bit-identical to a
    fresh optimizer's, for a parameter that trains from the start and one unfrozen later."""
    torch.manual_seed(0)
    start = [torch.randn(5) for _ in range(2)]
    params = {name: [torch.nn.Parameter(t.clone()) for t in start] for name in "ab"}

    def make(ps):
        if kind == "sgd":
            return torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)
        return torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01)

    fresh, primed = make(params["a"]), make(params["b"])
    init_optimizer_state(primed)
    assert all(torch.equal(a, b) for a, b in zip(*params.values()))  # priming moved nothing
    assert len(primed.state) == 2 and not fresh.state
    for step in range(4):
        grads = [torch.randn(5), torch.randn(5) if step >= 2 else None]  # unfrozen at step 2
        for opt, ps in ((fresh, params["a"]), (primed, params["b"])):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g.clone()
            opt.step()
        for a, b in zip(*params.values()):
            assert torch.equal(a, b), (kind, step)


def _weights(run_dir: Path, index: int = -1) -> dict[str, torch.Tensor]:
    """Model weights of an epoch-end checkpoint, whichever way Accelerate wrote them."""
    from safetensors.torch import load_file

    end = sorted((run_dir / "checkpoints").glob("step_*_end"))[index]
    if (end / "model.safetensors").is_file():  # not FSDP
        return load_file(str(end / "model.safetensors"))
    if (end / "pytorch_model_fsdp.bin").is_file():  # full state dict
        return torch.load(end / "pytorch_model_fsdp.bin", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    merged = run_dir / f"merged_{end.name}.pt"  # sharded: torch.distributed.checkpoint
    dcp_to_torch_save(str(end / "pytorch_model_fsdp_0"), str(merged))
    return torch.load(merged, weights_only=True)["model"]


def _launch(workdir: Path, procs: int, train_args: list[str], env=None, shim=False, port=None):
    """`transferkit train TRAIN_ARGS` in `procs` torchrun processes (through the CPU FSDP
    launcher with `shim`)."""
    entry = [str(TESTS / "fsdp_on_cpu.py")] if shim else ["-m", "transferkit.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
           "--master_port", str(port or free_port()), *entry, "train", *train_args]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600,
                          env=full_env)  # fmt: skip


def _new_run(workdir: Path, name: str, procs: int, *extra: str) -> list[str]:
    """Train arguments for a new run of RECIPE at a global batch of 32 over `procs`."""
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(RECIPE.replace("BATCH", str(32 // procs)))
    return [str(recipe), "--output", str(workdir / name), *extra]


@pytest.fixture(scope="module")
def one_process(workdir):
    """The same recipe without FSDP, in one process at the same global batch."""
    args = _new_run(workdir, "fsdp_reference", 1, "--set", "train.feature_cache=forbid")
    result = _launch(workdir, 1, args)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "fsdp_reference"


FSDP2 = {}  # examples/accelerate/fsdp.yaml as it is
FSDP1 = {"FSDP_VERSION": "1", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_AUTO_WRAP_POLICY": "NO_WRAP",
         # Accelerate's FSDP1 needs an accelerator device to sync module states from.
         "FSDP_SYNC_MODULE_STATES": "false"}  # fmt: skip
TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs; on CPU see the cpu-* cases"
)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("overrides", "device"),
    [
        pytest.param(FSDP2, "cpu", id="cpu-fsdp2-sharded"),
        pytest.param(FSDP1, "cpu", id="cpu-fsdp1-full"),
        pytest.param(FSDP2, "cuda", id="gpu-fsdp2-sharded", marks=[pytest.mark.gpu, TWO_GPUS]),
    ],
)
def test_fsdp_matches_one_process_across_a_phase_change_and_resumes(
    workdir, one_process, overrides, device
):
    env = {**launch_env(EXAMPLES / "fsdp.yaml"), **overrides}
    name = f"fsdp_{device}_v{env['FSDP_VERSION']}"
    shim = device == "cpu"
    result = _launch(workdir, 2, _new_run(workdir, name, 2), env=env, shim=shim)
    assert result.returncode == 0, result.stderr[-3000:]
    run = workdir / name
    # Phase 0 would train from cached features; under FSDP it must not (main process only).
    assert result.stdout.count("features: computed every step (FSDP shards the backbone)") == 1
    assert result.stdout.count("epoch 1: phase 1") == 1

    # SGD: 2 processes x 16 images against 1 x 32 differ by float summation order only
    # (measured on CPU: 1.2e-7, FSDP1 and FSDP2). A group that did not unfreeze, a lost shard
    # or momentum would be off by lr-sized steps (1e-3 and more). GPUs: not measured here.
    atol = 1e-6 if device == "cpu" else 1e-4
    final, reference = _weights(run), _weights(one_process)
    assert set(final) == set(reference)
    for key, value in reference.items():
        assert torch.allclose(final[key], value, rtol=0, atol=atol), key
    # Frozen throughout: bit-identical. Unfrozen at epoch 1 after wrapping: they moved.
    first = _weights(run, 0)
    frozen = [k for k in final if k.startswith(tuple(f"backbone.model.{p}" for p in FROZEN))]
    unfrozen = [k for k in final if k.startswith("backbone.model.blocks.3.")]
    assert frozen and all(torch.equal(final[k], reference[k]) for k in frozen)
    assert unfrozen and all(not torch.equal(first[k], final[k]) for k in unfrozen)
    # model.safetensors: gathered onto the main process, the same as without FSDP.
    from safetensors.torch import load_file

    best, best_reference = (
        load_file(run / "model.safetensors"),
        load_file(one_process / "model.safetensors"),
    )
    assert set(best) == set(best_reference)
    assert all(torch.allclose(best[k], v, rtol=0, atol=atol) for k, v in best_reference.items())
    summary = json.loads((run / "complete.json").read_text())
    assert (
        summary["best_epoch"]
        == json.loads((one_process / "complete.json").read_text())["best_epoch"]
    )
    # What each phase trains, counted over the shards as without FSDP.
    for ours, theirs in zip(records(run), records(one_process), strict=True):
        assert (ours["trainable_params"], ours["trainable_groups"]) == (
            theirs["trainable_params"], theirs["trainable_groups"])  # fmt: skip

    # Exact resume: drop the last checkpoint, continue from epoch 0's (where blocks 3-5 were
    # frozen and had no optimizer state of their own), and end where the full run ended.
    resumed = workdir / f"{name}_resumed"
    shutil.copytree(run, resumed)
    (resumed / "complete.json").unlink()
    shutil.rmtree(sorted((resumed / "checkpoints").glob("step_*_end"))[-1])
    result = _launch(workdir, 2, ["--resume", str(resumed)], env=env, shim=shim)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    after = _weights(resumed)
    for key, value in final.items():
        assert torch.allclose(after[key], value, rtol=0, atol=0 if device == "cpu" else 1e-5), key
    assert records(resumed)[-1]["val/digit/accuracy"] == records(run)[-1]["val/digit/accuracy"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPUs Accelerate does set up FSDP")
def test_fsdp_asked_on_a_cpu_is_one_clear_error(workdir):
    """Accelerate 1.15 on a CPU leaves DDP in place when FSDP is asked for: transferkit says
    so (exit code 2) rather than train a full copy of the model in every process. If a new
    Accelerate sets up FSDP on CPUs, this fails: then tests/fsdp_on_cpu.py can go."""
    env = launch_env(EXAMPLES / "fsdp.yaml")
    result = _launch(workdir, 2, _new_run(workdir, "fsdp_asked_on_cpu", 2), env=env)
    assert result.returncode != 0
    assert "ACCELERATE_USE_FSDP=true, but Accelerate" in result.stderr
    assert "would train with DDP instead" in result.stderr
    assert not (workdir / "fsdp_asked_on_cpu" / "checkpoints").exists()
