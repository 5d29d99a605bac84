"""Accelerate for one run: the Accelerator a recipe asks for, FSDP's limits, and what DDP and
FSDP need of the model and optimizer.

Distributed unfreezing: DDP registers only parameters that require grad when it wraps the
model (Lightning #20340). The model is prepared with every parameter trainable, before the
first phase freezes anything, and DDP runs with `find_unused_parameters=True`, so a group
unfrozen mid-run is already registered and its gradients are all-reduced; frozen parameters
are unused on every rank, keep `grad=None`, and the optimizer skips them.

FSDP (Accelerate's plugin, `ACCELERATE_USE_FSDP=true`, docs/distributed.md) shards the model
prepared the same way, and the phases freeze and unfreeze its parameters afterwards. That needs
per-parameter `requires_grad`: FSDP2, or FSDP1 with `use_orig_params=True` (without it each
wrapped unit is one flat parameter and no group could be frozen). `check_fsdp` refuses what
cannot work, and `init_optimizer_state` gives every parameter its optimizer state up front, so
that FSDP2 resumes a group that was frozen when the checkpoint was written.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import accelerate
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
)

from transferkit.engine.tracking import check_trackers
from transferkit.errors import UserError
from transferkit.recipes import Recipe
from transferkit.rundir import RunDir

if TYPE_CHECKING:  # imported where a balancer is built: torchjd is slow to import
    from transferkit.balancing import Balancer


def make_accelerator(
    recipe: Recipe, run_dir: RunDir | None = None, device: str | None = None
) -> Accelerator:
    """The Accelerator of a run; it logs to `train.trackers` (TensorBoard in the run folder by
    default), when there is a run folder.
    `device`: auto (a GPU when there is one; None too), cpu, cuda or cuda:N."""
    cfg = recipe.train
    cpu = _on_cpu(device)
    if cfg.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        # Accelerate silently trains in fp32 then: say so instead.
        raise UserError("train.mixed_precision: fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    # Accelerate keeps one global state per process; a second run in the same process (a
    # notebook, a sweep) with other settings (mixed precision) must start from a clean one.
    AcceleratorState._reset_state()
    project = None
    if run_dir is not None:
        project = ProjectConfiguration(
            project_dir=str(run_dir.path), logging_dir=str(run_dir.tensorboard_dir)
        )
    return Accelerator(
        # Without a GPU, Accelerate only sets up multi-process (gloo) training under torchrun
        # when told it runs on the CPU; otherwise each process would train alone.
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=_trackers(recipe, run_dir) if run_dir is not None else None,
        project_config=project,
        # The shuffling seed is the recipe's, not whatever the global RNG was when a loader was
        # prepared: loaders prepared later (over cached features) then shuffle exactly like the
        # image loader, on every process.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _trackers(recipe: Recipe, run_dir: RunDir) -> list | None:
    """`train.trackers` for Accelerate; TensorBoard as a tracker object, so that its events stay
    in tensorboard/tensorboard/ whatever the project is named (a resumed run's too)."""
    from accelerate.tracking import TensorBoardTracker

    names = list(recipe.train.trackers)
    check_trackers(names)
    return [
        TensorBoardTracker("tensorboard", str(run_dir.tensorboard_dir)) if n == "tensorboard" else n
        for n in names
    ] or None


def _on_cpu(device: str | None) -> bool:
    """Whether `train --device` asks for the CPU; cuda:N keeps GPU N visible alone."""
    if device in (None, "auto"):
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    if device == "cpu":
        return True
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    if index and os.environ.get("CUDA_VISIBLE_DEVICES") != index:
        if torch.cuda.is_initialized():
            raise UserError(f"--device {device}: CUDA is already set up in this process; "
                            f"set CUDA_VISIBLE_DEVICES={index} before it starts")  # fmt: skip
        os.environ["CUDA_VISIBLE_DEVICES"] = index  # before CUDA counts its devices
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use cpu or auto")
    return False


def check_fsdp(accelerator: Accelerator, balancer: Balancer | None) -> None:
    """FSDP as asked for, with what transferkit can train under it, or one clear error."""
    if accelerator.distributed_type != DistributedType.FSDP:
        asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # as Accelerate
        if asked and accelerator.num_processes > 1:
            # Accelerate switches to FSDP only for GPU-like devices (accelerate/state.py); on a
            # CPU it silently keeps DDP, a full copy of the model in every process.
            raise UserError(
                f"ACCELERATE_USE_FSDP=true, but Accelerate {accelerate.__version__} shards models "
                f"only on GPUs: on {accelerator.device.type} it would train with DDP instead. Run on "
                "GPUs, or launch without FSDP (no --use_fsdp, no fsdp_config) to train with DDP."
            )
        return
    from torch.distributed.fsdp import StateDictType

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise UserError(
            "FSDP1 without use_orig_params flattens each wrapped unit into one parameter, so the "
            "freeze schedule cannot freeze or unfreeze groups: set fsdp_use_orig_params: true "
            "(FSDP_USE_ORIG_PARAMS=true), or fsdp_version: 2"
        )
    # Both put wrapper modules into parameter names ("blocks.0._fsdp_wrapped_module.norm1.weight",
    # "..._checkpoint_wrapped_module..."), which the freeze schedule's group lookup does not know.
    if plugin.activation_checkpointing:
        raise UserError(
            "fsdp_activation_checkpointing: true renames the backbone's parameters, so the freeze "
            "schedule cannot find its groups; set it to false"
        )
    if plugin.fsdp_version == 1 and plugin.auto_wrap_policy is not None:
        raise UserError(
            "FSDP1 with an auto wrap policy renames the backbone's parameters, so the freeze "
            "schedule cannot find its groups: use fsdp_version: 2 (any policy), or "
            "fsdp_auto_wrap_policy: NO_WRAP"
        )
    if plugin.fsdp_version == 1 and plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
        # A parameter that lies wholly in another process's shard (a ViT's cls_token) is left
        # out of this process's sharded optimizer state, and torch.distributed.checkpoint then
        # fails to resume: "Missing key in checkpoint state_dict: optimizer.param_groups".
        raise UserError(
            "FSDP1 checkpoints need fsdp_state_dict_type: FULL_STATE_DICT (sharded ones do not "
            "resume); or use fsdp_version: 2, which resumes from sharded checkpoints"
        )
    if balancer is not None and not balancer.runs_under_fsdp:
        # Per-task gradients of the sharded weights, loss weights outside the FSDP model and a
        # forward pass outside it (FAMO) would all need the full, unsharded parameters.
        raise UserError(
            f"multitask.method: {balancer.name} does not run under FSDP (it needs per-task "
            "gradients, learnable loss weights or an extra forward pass of the unsharded model); "
            "use sum, mean or a loss-based method without parameters (dwa, rlw, gls), or DDP"
        )


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state now, all zeros, as if no step had been taken.

    Under FSDP2, Accelerate resumes the optimizer through torch.distributed.checkpoint, which
    wants saved state for every parameter that requires grad; a group frozen until the
    checkpoint has none ("Missing optimizer state for parameter 'backbone.model.cls_token'").
    With state for all from the start, every checkpoint has it. Zero momentum (SGD, dampening
    0) and zero moments at step 0 (AdamW) update exactly as a lazily created state does.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # the step creates the state and moves no parameter
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for param in params:
        param.grad = None
        for value in optimizer.state[param].values():
            if torch.is_tensor(value):
                value.zero_()  # SGD's buffer took weight decay * param; AdamW counted a step


def optimizer_steps_per_epoch(batches: int, accelerator: Accelerator) -> int:
    """Optimizer steps per epoch on each process: `batches` (the unsharded loader's length) are
    shared out over the processes, and each takes a step every `grad_accum` of its batches."""
    per_process = math.ceil(batches / accelerator.num_processes)
    return max(math.ceil(per_process / accelerator.gradient_accumulation_steps), 1)
