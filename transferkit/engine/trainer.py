"""`train(recipe)`: one fine-tuning run on Accelerate, from recipe to run folder.

Accelerate is used through a few explicit calls (`prepare`, `accumulate`, `backward`,
`gather_for_metrics`, `save_state`/`load_state`); the freeze schedule is checkpointed through
`register_for_checkpointing`, so a resumed run re-derives its phase from the epoch.

Distributed unfreezing: DDP registers only parameters that require grad when it wraps the
model (Lightning #20340). The model is prepared with every parameter trainable, before the
first phase freezes anything, and DDP runs with `find_unused_parameters=True`, so a group
unfrozen mid-run is already registered and its gradients are all-reduced; frozen parameters
are unused on every rank, keep `grad=None`, and the optimizer skips them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from transferkit.balancing import Balancer, objective_gradients, write_direction
from transferkit.data import TaskImageDataset, build_transforms, collate, load_data
from transferkit.engine import feature_cache
from transferkit.engine import metrics as task_metrics
from transferkit.engine.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from transferkit.engine.losses import multitask_loss
from transferkit.engine.optim import build_lr_scheduler, build_optimizer
from transferkit.engine.run import model_info, save_model
from transferkit.engine.schedule import FreezeSchedule
from transferkit.errors import UserError, did_you_mean
from transferkit.models import AuxHeadSpec, MultiTaskModel, create_backbone
from transferkit.recipes import Recipe, save_recipe
from transferkit.seeding import derive_seed

logger = logging.getLogger("transferkit")
LOWER_IS_BETTER = ("mae", "rmse", "loss")


def _prepare_run_dir(recipe: Recipe, output: str | None, resume: str | None) -> Path:
    if resume:
        run_dir = Path(resume)
        if not list_checkpoints(run_dir):
            raise UserError(
                f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}"
            )
        return run_dir
    run_dir = Path(output) if output else Path(recipe.output_dir) / recipe.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write the run folder {run_dir}: {err.strerror}; choose another with --output"
        ) from None
    return run_dir


def train(recipe: Recipe, output: str | None = None, resume: str | None = None) -> Path:
    """Fine-tune as the recipe says; returns the run folder."""
    cfg = recipe.train
    run_dir = _prepare_run_dir(recipe, output, resume)
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        # Accelerate silently trains in fp32 then: say so instead.
        raise UserError("train.mixed_precision: fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    # Accelerate keeps one global state per process; a second run in the same process (a
    # notebook, a sweep) with other settings (mixed precision) must start from a clean one.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # Without a GPU, Accelerate only sets up multi-process (gloo) training under torchrun
        # when told it runs on the CPU; otherwise each process would train alone.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(recipe.seed)
    main = accelerator.is_main_process
    if main:
        save_recipe(recipe, run_dir / "recipe.yaml")

    # ---- model and data
    backbone = create_backbone(recipe.model.backbone, recipe.model.weights, **recipe.model.kwargs)
    if backbone.load_report and main:
        print(f"backbone weights: {backbone.load_report}")
    with accelerator.main_process_first():
        data = load_data(recipe.data, recipe.tasks, recipe.seed)
    chosen_metrics = {name: section.metrics for name, section in recipe.tasks.items()}
    monitor = cfg.monitor or _default_monitor(data.tasks, chosen_metrics)
    _check_monitor(monitor, data.tasks, chosen_metrics)
    if data.skipped_images and main:
        (run_dir / "skipped_images.txt").write_text("\n".join(data.skipped_images) + "\n")
        print(
            f"skipped {len(data.skipped_images)} unreadable images (listed in {run_dir / 'skipped_images.txt'})"
        )
    aux = [AuxHeadSpec(a.task, a.group, a.hidden, a.dropout) for a in recipe.model.aux_heads]
    size = recipe.data.image_size
    if size:
        backbone.data_config = dataclasses.replace(backbone.data_config, input_size=(3, size, size))
    model = MultiTaskModel(backbone, data.tasks, aux)
    tasks = {t.name: t for t in data.tasks}
    weights = {name: section.weight for name, section in recipe.tasks.items()}
    schedule = FreezeSchedule(backbone, recipe.schedule.phases, recipe.schedule.layer_decay)

    train_set = TaskImageDataset(
        data.splits["train"],
        data.tasks,
        build_transforms(backbone.data_config, True, recipe.data.augment, size),
        bad_images=recipe.data.bad_images,
        seed=recipe.seed,
    )
    eval_transform = build_transforms(backbone.data_config, False, "none", size)
    val_set = TaskImageDataset(
        data.splits["validation"], data.tasks, eval_transform, bad_images=recipe.data.bad_images
    )
    if cfg.auto_batch_size:
        cfg = _auto_batch_size(model, cfg, backbone.data_config.input_size, accelerator)
    workers = _num_workers(recipe.data.num_workers)
    # No persistent workers: each epoch's workers must see the dataset's new `epoch` (seeds).
    loader_args = {
        "collate_fn": collate,
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
    }
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train_set) > cfg.batch_size,
        **loader_args,
    )
    val_loader = DataLoader(
        val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, **loader_args
    )

    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    balancer = None
    if recipe.multitask.method != "sum":  # plain sum: the loss path has no balancer
        balancer = Balancer(recipe.multitask.method, model.output_keys, recipe.multitask.options,
                            recipe.seed)  # fmt: skip
        balancer.impl.to(accelerator.device)
        if accelerator.num_processes > 1 and balancer.kind == "loss":
            balancer.impl.reduce = partial(accelerator.reduce, reduction="mean")
    optimizer = build_optimizer(model, cfg)
    if balancer is not None and balancer.kind == "loss" and balancer.impl.learnable:
        # UW and IMTL-L learn their weights by gradient descent with the model.
        optimizer.add_param_group({"params": list(balancer.impl.parameters()), "weight_decay": 0.0,
                                   "lr": recipe.multitask.lr or cfg.lr, "group": "loss_weights"})  # fmt: skip
    steps_per_epoch = max(
        math.ceil(len(train_loader) / (cfg.grad_accum * accelerator.num_processes)), 1
    )
    lr_scheduler = build_lr_scheduler(optimizer, cfg, schedule, steps_per_epoch)
    # Prepared while every parameter requires grad, so DDP registers all of them (see module doc).
    model, optimizer, train_loader, val_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, lr_scheduler
    )
    accelerator.register_for_checkpointing(schedule)
    if balancer is not None:
        accelerator.register_for_checkpointing(balancer)
    accelerator.init_trackers("tensorboard")

    state = {"epoch": 0, "batches": 0, "epoch_done": False, "step": 0, "best": None,
             "best_epoch": None, "best_checkpoint": None, "bad_epochs": 0, "skipped_steps": 0}  # fmt: skip
    if resume:
        path, state = load_checkpoint(accelerator, run_dir)
        if main:
            _truncate_metrics(run_dir, state)
            print(f"resumed from {path} (epoch {state['epoch']}, step {state['step']})")
    first_epoch = state["epoch"] + 1 if state["epoch_done"] else state["epoch"]
    resume_batches = 0 if state["epoch_done"] else state["batches"]
    fit = TrainLoop(accelerator, model, optimizer, lr_scheduler, tasks, weights, cfg, recipe.seed,
                    run_dir, balancer)  # fmt: skip
    current_phase = None

    for epoch in range(first_epoch, cfg.epochs):
        phase = schedule.apply(epoch)
        if main:
            trainable = schedule.phases[phase][1].trainable_groups(backbone)
            print(
                f"epoch {epoch}: phase {phase} ({schedule.phases[phase][1]}), trainable groups: {', '.join(trainable) or 'heads only'}"
            )
        state.update(epoch=epoch, epoch_done=False)
        use_cache, why = feature_cache.decide(
            cfg.feature_cache, backbone, recipe.data.augment, bool(aux), phase
        )
        if phase != current_phase:
            if main:
                print(why)
            if cfg.compile:
                # A compiled graph keeps the requires_grad it was traced with, so a group unfrozen
                # later would silently not train (pytorch #139476): compile again for each phase.
                torch._dynamo.reset()
                fit.forward_module = torch.compile(model, backend=cfg.compile_backend)
            loaders = (train_loader, val_loader)
            if use_cache:
                loaders = _cached_loaders(
                    accelerator,
                    backbone,
                    train_set,
                    val_set,
                    cfg,
                    workers,
                    run_dir / "feature_cache",
                )
            current_phase = phase
        epoch_train_loader, epoch_val_loader = loaders
        train_set.epoch = epoch
        epoch_train_loader.set_epoch(epoch)
        loader = epoch_train_loader
        if epoch == first_epoch and resume_batches:
            state["batches"] = resume_batches  # mid-epoch resume: skip what was already trained
            loader = accelerator.skip_first_batches(epoch_train_loader, resume_batches)
        else:
            state["batches"] = 0
        stats = fit.epoch(loader, state)
        values = evaluate(
            fit.forward_module, epoch_val_loader, tasks, accelerator, "val", chosen_metrics
        )
        record = {"epoch": epoch, "step": state["step"], "phase": phase, **stats, **values,
                  "skipped_steps": state["skipped_steps"], **_footprint(backbone, model)}  # fmt: skip
        record["lr"] = {g["group"]: g["lr"] for g in optimizer.param_groups if "group" in g}
        accelerator.log(
            {k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state["step"]
        )
        improved = _update_best(state, record, monitor, cfg.monitor_mode, cfg.early_stopping)
        state["epoch_done"] = True
        if improved:
            state["best_checkpoint"] = checkpoint_name(state["step"], True)
        if main:
            with (run_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(_summary(record, monitor))
        save_checkpoint(accelerator, run_dir, state, cfg.keep_checkpoints)
        if improved and main:
            save_model(accelerator.unwrap_model(model), _info(model, recipe, accelerator), run_dir)
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break
        if cfg.early_stopping and state["bad_epochs"] >= cfg.early_stopping.patience:
            if main:
                print(
                    f"early stopping: {monitor} has not improved for {state['bad_epochs']} epochs"
                )
            break
    if main and not (run_dir / "model.json").is_file():
        save_model(accelerator.unwrap_model(model), _info(model, recipe, accelerator), run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


class TrainLoop:
    """The training steps of one epoch, with step checkpoints and the non-finite-loss policy
    (public for the benchmarks, which time it against a hand-written loop)."""

    def __init__(
        self, accelerator, model, optimizer, lr_scheduler, tasks, weights, cfg, seed, run_dir,
        balancer: Balancer | None = None,
    ) -> None:  # fmt: skip
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.lr_scheduler, self.tasks, self.weights = lr_scheduler, tasks, weights
        self.cfg, self.seed, self.run_dir = cfg, seed, run_dir
        self.forward_module = model  # the compiled model when train.compile is on
        self.balancer = balancer
        self.gradient_based = balancer is not None and balancer.kind == "gradient"
        self._window: dict | None = None  # Jacobians accumulated over micro-batches

    def epoch(self, loader, state: dict) -> dict:
        """Train over `loader`; `state` (epoch, batches, step, ...) is updated as it goes."""
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        start, seen, running = time.perf_counter(), 0, None
        totals: dict[str, float] = {}  # per-task weights and gradient cosines, epoch means
        counts: dict[str, int] = {}
        # The bar only on a terminal: in logs (CI, nohup) it would print a line per update.
        bar = tqdm(loader, desc=f"epoch {state['epoch']}", leave=False,
                   disable=not acc.is_main_process or not sys.stderr.isatty())  # fmt: skip
        for batch in bar:
            # Dropout and other in-model randomness depend on the position only, so a run
            # resumed at any step replays them exactly (saved RNG states would not survive the
            # draws that creating a data iterator makes).
            torch.manual_seed(
                derive_seed(self.seed, state["epoch"], state["batches"], acc.process_index)
            )
            state["batches"] += 1
            with acc.accumulate(self.model):
                # Gradient-based methods write gradients themselves: DDP must not all-reduce.
                with acc.no_sync(self.model) if self.gradient_based else contextlib.nullcontext():
                    outputs = model_outputs(self.forward_module, batch, cfg.channels_last)
                loss, losses = multitask_loss(
                    outputs, batch["targets"], batch["mask"], self.tasks, self.weights
                )
                if self.balancer is not None and not self.gradient_based:
                    vector, present = self.balancer.stack(losses)
                    loss = self.balancer.combine(
                        vector, self._present(batch, present), state["epoch"], state["batches"]
                    )
                if not self._finite(loss):
                    self._nonfinite(losses, state)
                    continue
                if self.gradient_based:
                    self._jacobian_backward(losses, batch)
                    if acc.sync_gradients:
                        self._aggregate(state)
                else:
                    acc.backward(loss)
                    if acc.sync_gradients and self.balancer is not None:
                        self._sync_loss_weight_grads()
                if cfg.clip_grad and acc.sync_gradients:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients and self.balancer is not None:
                    self._after_step(batch)
            seen += batch["index"].shape[0] * acc.num_processes
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            bar.set_postfix(
                loss=f"{running:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}"
            )
            if not acc.sync_gradients:
                continue
            state["step"] += 1
            balance = self._balance_values()
            for key, value in balance.items():
                totals[key] = totals.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            if state["step"] % cfg.log_every == 0:
                acc.log(
                    {
                        "train/loss": loss.item(),
                        **{f"train/loss_{k}": v.item() for k, v in losses.items()},
                        **{f"train/{k}": v for k, v in balance.items()},
                    },
                    step=state["step"],
                )
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint(acc, self.run_dir, state, cfg.keep_checkpoints)
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                break
        elapsed = time.perf_counter() - start
        if self.balancer is not None:
            self.balancer.impl.end_epoch()
        return {
            "train/loss": running,
            "epoch_time_s": round(elapsed, 3),
            "images_per_s": round(seen / max(elapsed, 1e-9), 1),
            **{k: round(v / counts[k], 6) for k, v in totals.items()},
        }

    # ---- multi-task balancing (see transferkit.balancing)
    def _present(self, batch: dict, local: torch.Tensor) -> torch.Tensor:
        """Which objectives have a label anywhere in the global batch (the same on every rank)."""
        masks = batch["mask"]
        flags = torch.tensor(
            [bool(p) and bool(masks[MultiTaskModel.task_of(k)].any())
             for k, p in zip(self.balancer.objectives, local.tolist())],
            dtype=torch.float32, device=self.accelerator.device,
        )  # fmt: skip
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        return flags > 0

    def _model_and_shared(self):
        model = self.accelerator.unwrap_model(self.model)
        shared = [p for p in model.backbone.parameters() if p.requires_grad]
        return model, shared

    def _jacobian_backward(self, losses: dict, batch: dict) -> None:
        """Add this micro-batch's per-objective gradients to the accumulation window."""
        acc, balancer = self.accelerator, self.balancer
        model, shared = self._model_and_shared()
        keys = [k for k in balancer.objectives if k in losses]
        scaler = acc.scaler
        scale = scaler.get_scale() if scaler is not None else 1.0
        # As `accelerator.backward` does: divide by the accumulation steps.
        factor = scale / acc.gradient_accumulation_steps
        own = [list(model.head_of(k).parameters()) for k in keys]
        rows, own_grads = objective_gradients([losses[k] for k in keys], shared, own, factor)
        jacobian = rows.new_zeros(len(balancer.objectives), rows.shape[1])
        index = torch.tensor([balancer.objectives.index(k) for k in keys], device=rows.device)
        jacobian[index] = rows
        for params, grads in zip(own, own_grads):
            for param, grad in zip(params, grads):
                param.grad = grad if param.grad is None else param.grad + grad
        vector, present = balancer.stack(losses)
        labelled = self._present(batch, present).float()
        window = self._window
        if window is None:
            self._window = {"jacobian": jacobian, "losses": vector.detach(), "labelled": labelled,
                            "micro": 1, "scale": scale}  # fmt: skip
        else:
            window["jacobian"] += jacobian
            window["losses"] += vector.detach()
            window["labelled"] += labelled
            window["micro"] += 1

    def _aggregate(self, state: dict) -> None:
        """End of an accumulation window: average over processes, aggregate, write `.grad`."""
        acc, window, self._window = self.accelerator, self._window, None
        model, shared = self._model_and_shared()
        jacobian, scale = window["jacobian"], window["scale"]
        losses = window["losses"] / window["micro"]
        if acc.num_processes > 1:
            # Every rank must aggregate the same global Jacobian: a nonlinear aggregator of
            # per-rank Jacobians, averaged afterwards, is not the aggregator of the average.
            jacobian = acc.reduce(jacobian, reduction="mean")
            losses = acc.reduce(losses, reduction="mean")
            shared_ids = {id(p) for p in shared}
            heads = [
                p for p in model.parameters() if p.grad is not None and id(p) not in shared_ids
            ]
            flat = acc.reduce(torch.cat([p.grad.reshape(-1) for p in heads]), reduction="mean")
            offset = 0
            for param in heads:
                param.grad.copy_(flat[offset : offset + param.numel()].view_as(param))
                offset += param.numel()
        present = window["labelled"] > 0
        if not shared:
            return  # a linear probe: heads have their gradients, nothing is shared
        direction = self.balancer.scaled_direction(
            jacobian, losses, present, scale, state["epoch"], state["batches"]
        )
        write_direction(direction, shared)

    def _sync_loss_weight_grads(self) -> None:
        """UW / IMTL-L parameters live outside the DDP model: average their gradients here."""
        if self.accelerator.num_processes == 1:
            return
        for param in self.balancer.impl.parameters():
            if param.grad is not None:
                param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    def _after_step(self, batch: dict) -> None:
        """FAMO: the same batch's losses after the update (no gradient; BatchNorm statistics
        and the random stream are restored, so the extra forward changes nothing else)."""
        if not getattr(self.balancer.impl, "needs_losses_after_step", False):
            return
        model = self.accelerator.unwrap_model(self.model)
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            outputs = model_outputs(model, batch, self.cfg.channels_last)
            _, losses = multitask_loss(
                outputs, batch["targets"], batch["mask"], self.tasks, self.weights
            )
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        vector, present = self.balancer.stack(losses)
        self.balancer.impl.after_step(vector, self._present(batch, present))

    def _balance_values(self) -> dict[str, float]:
        if self.balancer is None:
            return {}
        values = {f"mtl/weight/{k}": v for k, v in self.balancer.weights_dict().items()}
        values.update({f"mtl/cos/{k}": v for k, v in self.balancer.cosines_dict().items()})
        return values

    def _finite(self, loss) -> bool:
        # Every process must take the same decision, or DDP's all-reduce would hang.
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        return bool(
            self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes
        )

    def _nonfinite(self, losses: dict, state: dict) -> None:
        bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["(another process)"]
        where = f"epoch {state['epoch']}, step {state['step'] + 1} (batch {state['batches']})"
        if self.cfg.nonfinite == "stop":
            raise UserError(
                f"non-finite loss for task {', '.join(bad)} at {where}; lower train.lr, check that "
                "task's labels, or set train.nonfinite: skip. The last good checkpoint is kept."
            )
        state["skipped_steps"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.is_main_process:
            print(f"skipped a step with a non-finite loss for {', '.join(bad)} at {where}")


def model_outputs(model, batch: dict, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """The model's outputs for a batch of images, or of cached features."""
    if "features" in batch:
        return model(features=batch["features"])
    images = batch["image"]
    return model(images.contiguous(memory_format=torch.channels_last) if channels_last else images)


def _auto_batch_size(model, cfg, input_size, accelerator: Accelerator):
    """Halve the per-device batch until a training step fits in memory; accumulate gradients to
    keep the global batch. The probe's effects on weights and statistics are undone."""
    from accelerate.utils import find_executable_batch_size

    model.to(accelerator.device)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @find_executable_batch_size(starting_batch_size=cfg.batch_size)
    def probe(batch_size: int) -> int:
        model.zero_grad(set_to_none=True)
        outputs = model(torch.randn(batch_size, *input_size, device=accelerator.device))
        sum(out.float().mean() for out in outputs.values()).backward()
        return batch_size

    try:
        fitted = probe()
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    accumulation = cfg.grad_accum * math.ceil(cfg.batch_size / fitted)
    accelerator.gradient_accumulation_steps = accumulation
    if accelerator.is_main_process:
        print(
            f"auto batch size: {fitted} per device, {accumulation} accumulation steps (train.batch_size {cfg.batch_size})"
        )
    return dataclasses.replace(cfg, batch_size=fitted, grad_accum=accumulation)


def _footprint(backbone, model) -> dict:
    """What this phase trains and the peak memory so far (CUDA allocator, else process RSS)."""
    import resource

    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    trainable = [g["name"] for g in backbone.group_summary() if g["trainable"]]
    return {
        "trainable_groups": len(trainable),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_memory_mb": round(peak_mb, 1),
    }


def _num_workers(requested: int | None) -> int:
    """data.num_workers, or by default one worker per spare core (at most 8)."""
    return requested if requested is not None else min(8, max(0, (os.cpu_count() or 1) - 1))


def _cached_loaders(accelerator, backbone, train_set, val_set, cfg, workers: int, disk_dir: Path):
    """Loaders over backbone features computed once, batched and shuffled like the image ones."""
    device = accelerator.device
    build = partial(feature_cache.build_cache, backbone, batch_size=cfg.eval_batch_size or cfg.batch_size,
                    num_workers=workers, device=device, max_gb=cfg.feature_cache_max_gb)  # fmt: skip
    train_cache = build(train_set, disk_dir=disk_dir / "train")
    val_cache = build(val_set, disk_dir=disk_dir / "validation")
    train_loader = DataLoader(train_cache, batch_size=cfg.batch_size, shuffle=True,
                              drop_last=len(train_cache) > cfg.batch_size, collate_fn=collate)  # fmt: skip
    val_loader = DataLoader(
        val_cache, batch_size=cfg.eval_batch_size or cfg.batch_size, collate_fn=collate
    )
    return accelerator.prepare_data_loader(train_loader), accelerator.prepare_data_loader(
        val_loader
    )


def _truncate_metrics(run_dir: Path, state: dict) -> None:
    """Drop metrics.jsonl records written after the checkpoint being resumed from."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    last = state["epoch"] if state["epoch_done"] else state["epoch"] - 1
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= last]
    path.write_text("".join(line + "\n" for line in kept))


def _info(model, recipe: Recipe, accelerator: Accelerator) -> dict:
    return model_info(
        accelerator.unwrap_model(model),
        recipe.model.backbone,
        recipe.model.kwargs,
        recipe.data.image_size,
    )


def _default_monitor(tasks, chosen: dict) -> str:
    first = tasks[0]
    names = task_metrics.metric_names(first, chosen.get(first.name))
    preferred = "mae" if first.kind == "regression" else "accuracy"
    return f"val/{first.name}/{preferred if preferred in names else names[0]}"


def _check_monitor(monitor: str, tasks, chosen: dict) -> None:
    """Fail before training, not after the first epoch, when train.monitor names no metric."""
    valid = [
        f"val/{t.name}/{m}" for t in tasks for m in task_metrics.metric_names(t, chosen.get(t.name))
    ]
    if monitor not in valid:
        raise UserError(
            f"train.monitor: {monitor!r} is not a validation metric of this run.{did_you_mean(monitor, valid)} Metrics: {', '.join(valid)}"
        )


def _update_best(state: dict, record: dict, monitor: str, mode: str, early) -> bool:
    """Track the best value of the monitored metric; True when this epoch is the new best."""
    value = record[monitor]
    if math.isnan(value):
        return state["best"] is None and state["epoch"] < 0  # keep a model even without a metric
    if monitor.rsplit("/", 1)[-1] in LOWER_IS_BETTER:
        mode = "min"  # errors improve downwards whatever train.monitor_mode says
    delta = early.min_delta if early else 0.0
    better = state["best"] is None or (
        value > state["best"] + delta if mode == "max" else value < state["best"] - delta
    )
    if better:
        state.update(best=value, best_epoch=record["epoch"], bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    return better


def _summary(record: dict, monitor: str) -> str:
    parts = [
        f"epoch {record['epoch']}",
        # No loss when a resumed epoch had no batch left to train.
        f"loss {record['train/loss']:.4f}" if record["train/loss"] is not None else "loss -",
        f"{record['images_per_s']:.0f} img/s",
    ]
    parts += [
        f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val/") and isinstance(v, float)
    ]
    return " | ".join(parts)


@torch.no_grad()
def evaluate(
    model,
    loader,
    tasks: dict,
    accelerator: Accelerator,
    prefix: str = "val",
    metric_names: dict[str, list[str] | None] | None = None,
) -> dict[str, float]:
    """Per-task metrics over a loader; every sample counted once across processes.

    `metric_names` picks metrics per task (a recipe's `tasks.NAME.metrics`); default: all.
    """
    model.eval()
    metric_names = metric_names or {}
    collections = {
        name: task_metrics.task_metrics(task, metric_names.get(name))
        for name, task in tasks.items()
    }
    counts = dict.fromkeys(tasks, 0)  # labelled rows seen: proof that each is counted once
    for batch in loader:
        outputs = model_outputs(model, batch)
        outputs = {k: v for k, v in outputs.items() if k in tasks}
        outputs, targets, masks = accelerator.gather_for_metrics(
            (outputs, batch["targets"], batch["mask"])
        )
        for name, task in tasks.items():
            task_metrics.update(
                collections[name], task, outputs[name].cpu(), targets[name].cpu(), masks[name].cpu()
            )
            counts[name] += int(masks[name].sum())
    values = {}
    for name, collection in collections.items():
        for metric, value in task_metrics.compute(collection).items():
            values[f"{prefix}/{name}/{metric}"] = value
        values[f"{prefix}/{name}/count"] = counts[name]
    return values
