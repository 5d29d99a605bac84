"""`train(recipe)`: one fine-tuning run, from recipe to a complete run folder.

    setup = set_up(recipe)                      # setup.py: folder, Accelerate, model, data...
    for epoch in epochs:
        phase = schedule.apply(epoch)           # freeze as the phase says; re-compile, cache
        stats = loop.epoch(loader, state)       # loop.py: the steps
        values = evaluate(...)                  # evaluate.py
        record, keep the best model, checkpoint, stop early?
    run_dir.mark_complete(...)                  # written last

Accelerate is used through a few explicit calls (`prepare`, `accumulate`, `backward`,
`gather_for_metrics`, `save_state`/`load_state`); the freeze schedule and the balancer are
checkpointed through `register_for_checkpointing`, so a resumed run re-derives its phase from
the epoch.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import DistributedType, broadcast_object_list
from torch.utils.data import DataLoader

from transferkit.core import LOWER_IS_BETTER
from transferkit.data import collate
from transferkit.engine.batches import drop_last
from transferkit.engine.checkpoint import load_checkpoint, save_checkpoint
from transferkit.engine.ema import PREFIX as EMA_PREFIX
from transferkit.engine.ema import monitored
from transferkit.engine.evaluation import evaluate
from transferkit.engine.loop import TrainLoop
from transferkit.engine.schedule import UNFROZEN_LR_MULT
from transferkit.engine.setup import RunSetup, only_adapter_trains, set_up
from transferkit.errors import UserError
from transferkit.features import (
    FeatureStore,
    backbone_id,
    build_cache,
    cache_decision,
    cache_root,
    shard_rows,
    shared_cache,
)
from transferkit.models import adapter_state
from transferkit.recipes import Recipe
from transferkit.rundir import checkpoint_name, render_card


def train(recipe: Recipe, output: str | None = None, resume: str | None = None) -> Path:
    """Fine-tune as the recipe says; returns the run folder's path (see `RunDir`)."""
    run = set_up(recipe, output, resume)
    acc, cfg, run_dir, schedule = run.accelerator, run.cfg, run.run_dir, run.schedule
    main = acc.is_main_process
    acc.init_trackers("tensorboard")

    state = {"epoch": 0, "batches": 0, "epoch_done": False, "step": 0, "best": None,
             "best_epoch": None, "best_checkpoint": None, "bad_epochs": 0, "skipped_steps": 0}  # fmt: skip
    if resume:
        path, state = load_checkpoint(acc, run_dir)
        if main:
            run_dir.truncate_records(state["epoch"] if state["epoch_done"] else state["epoch"] - 1)
            print(f"resumed from {path} (epoch {state['epoch']}, step {state['step']})")
    first_epoch = state["epoch"] + 1 if state["epoch_done"] else state["epoch"]
    resume_batches = 0 if state["epoch_done"] else state["batches"]
    checkpoint = partial(save_checkpoint, acc, run_dir, keep=cfg.keep_checkpoints)
    loop = TrainLoop(acc, run.model, run.optimizer, run.lr_scheduler, run.tasks, cfg, recipe.seed,
                     run.strategy, checkpoint, run.regularizers, run.ema, run.mixer)  # fmt: skip
    monitor = monitored(run.monitor, cfg.ema)  # the EMA's metric when it is the final model
    current_phase, loaders = None, (run.train_loader, run.val_loader)
    stopped = "finished"

    for epoch in range(first_epoch, cfg.epochs):
        phase = schedule.apply(epoch)
        if main:
            trainable = schedule.phases[phase][1].trainable_groups(run.backbone)
            print(
                f"epoch {epoch}: phase {phase} ({schedule.phases[phase][1]}), trainable groups: {', '.join(trainable) or 'heads only'}"
            )
        state.update(epoch=epoch, epoch_done=False)
        if phase != current_phase:
            loaders = _enter_phase(run, loop, phase)
            current_phase = phase
        train_loader, val_loader = loaders
        run.train_set.epoch = epoch
        train_loader.set_epoch(epoch)
        loader = train_loader
        if epoch == first_epoch and resume_batches:
            state["batches"] = resume_batches  # mid-epoch resume: skip what was already trained
            loader = acc.skip_first_batches(train_loader, resume_batches)
        else:
            state["batches"] = 0
        stats = loop.epoch(loader, state)
        values = evaluate(loop.forward_module, val_loader, run.tasks, acc, "val", run.metric_names)
        if run.ema is not None:
            # Cached features come from the raw backbone; once a phase has trained it, the
            # average's own backbone differs, so the average is evaluated on the images.
            ema_loader = run.val_loader if schedule.backbone_trained_by(epoch) else val_loader
            values |= evaluate(run.ema.module, ema_loader, run.tasks, acc, EMA_PREFIX,
                               run.metric_names)  # fmt: skip
        record = {"epoch": epoch, "step": state["step"], "phase": phase, **stats, **values,
                  "skipped_steps": state["skipped_steps"], **_footprint(run)}  # fmt: skip
        record["lr"] = {g["group"]: g["lr"] for g in run.optimizer.param_groups if "group" in g}
        acc.log(
            {k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state["step"]
        )
        improved = _update_best(state, record, monitor, cfg.monitor_mode, cfg.early_stopping)
        state["epoch_done"] = True
        if improved:
            state["best_checkpoint"] = checkpoint_name(state["step"], True)
        if main:
            run_dir.append_record(record)
            print(_summary(record, monitor))
        save_checkpoint(acc, run_dir, state, cfg.keep_checkpoints)
        if improved:
            _save_model(run, epoch)
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            stopped = "max_steps"
            break
        if cfg.early_stopping and state["bad_epochs"] >= cfg.early_stopping.patience:
            stopped = "early_stopping"
            if main:
                print(
                    f"early stopping: {monitor} has not improved for {state['bad_epochs']} epochs"
                )
            break
    # The main process decides (other machines may not see its folder), and all take part:
    # under FSDP every process joins in gathering the weights.
    if broadcast_object_list([main and not run_dir.has_model()])[0]:
        _save_model(run, state["epoch"])
    acc.wait_for_everyone()
    if main:  # last: only now does the folder count as a finished run
        summary = {"stopped": stopped, "monitor": monitor, "best": state["best"],
                   "best_epoch": state["best_epoch"], "epochs": state["epoch"] + 1,
                   "steps": state["step"], "card": _card_facts(run)}  # fmt: skip
        _write_card(run_dir, summary)
        run_dir.mark_complete(summary)
    acc.end_training()
    return run_dir.path


def _card_facts(run: RunSetup) -> dict:
    """What only training knows, for the model card: split sizes, label coverage, hardware."""
    data = {
        split: {"images": len(ds), "labelled": {t: int(m.sum()) for t, m in ds.masks.items()}}
        for split, ds in (("train", run.train_set), ("validation", run.val_set))
    }
    acc = run.accelerator
    device = acc.device.type
    if device == "cuda":
        device = torch.cuda.get_device_name(acc.device)
    report = run.backbone.load_report
    return {
        "data": data,
        "hardware": f"{acc.num_processes} x {device}, mixed precision {acc.mixed_precision}, "
        f"torch {torch.__version__}",
        "weights_report": str(report) if report else None,
    }


def _write_card(run_dir, summary: dict) -> None:
    """README.md before complete.json; a card that cannot be written must not fail a trained run."""
    try:
        run_dir.write_card(render_card(run_dir, summary))
    except Exception as err:  # documentation only: say so and finish the run
        print(f"warning: model card {run_dir.card_path} not written: {type(err).__name__}: {err}")


def _enter_phase(run: RunSetup, loop: TrainLoop, phase: int) -> tuple[DataLoader, DataLoader]:
    """A new phase: compile again if asked, and train from cached features when it can."""
    cfg, recipe = run.cfg, run.recipe
    use_cache, why = cache_decision(
        cfg.feature_cache, run.backbone, recipe.data.augment, bool(recipe.model.aux_heads), phase
    )
    if use_cache and run.accelerator.distributed_type == DistributedType.FSDP:
        # The cache calls the backbone itself, outside the FSDP wrapper, where each process
        # holds only a flat shard of its weights ("weight should have at least three dimensions").
        if cfg.feature_cache == "force":
            raise UserError(
                f"train.feature_cache: force, but phase {phase} runs under FSDP: the cache would "
                "run the backbone outside FSDP, on a shard of its weights; use auto or forbid"
            )
        use_cache, why = False, "features: computed every step (FSDP shards the backbone)"
    if use_cache and run.mixer is not None:
        if cfg.feature_cache == "force":
            raise UserError(
                "train.feature_cache: force, but train.mixup mixes images, which cached features "
                "are not; use auto or forbid, or remove train.mixup"
            )
        use_cache, why = False, "features: computed every step (train.mixup mixes the images)"
    if run.accelerator.is_main_process:
        print(why)
        for note in (_norm_note(run), _rate_note(run, phase)):
            if note:
                print(note)
    if cfg.compile:
        # A compiled graph keeps the requires_grad it was traced with, so a group unfrozen
        # later would silently not train (pytorch #139476): compile again for each phase.
        torch._dynamo.reset()
        loop.forward_module = torch.compile(run.model, backend=cfg.compile_backend)
    if not use_cache:
        return run.train_loader, run.val_loader
    return cached_loaders(run)


# Above this multiplier, or with no warmup, AdamW's first steps on pretrained groups unfrozen
# after a probe cost 15 points of validation accuracy in the first fine-tune epoch
# (docs/quality.md); at 0.25 with a warmup, a few points at most.
SAFE_UNFROZEN_LR_MULT = 0.3


def _rate_note(run: RunSetup, phase: int) -> str | None:
    """At a phase change: a warning when pretrained groups that an earlier phase kept frozen
    start training at a rate that made LP-FT collapse."""
    schedule = run.schedule
    if not run.recipe.model.weights or run.cfg.optimizer != "adamw" or phase == 0:
        return None
    if only_adapter_trains(run.recipe):  # no pretrained weight moves
        return None
    start = schedule.phases[phase][0]
    earlier = set().union(
        *(s.trainable_groups(run.backbone) for _, s, _ in schedule.phases[:phase])
    )
    frozen_before = set(run.backbone.group_names) - earlier
    joining = set(schedule.phases[phase][1].trainable_groups(run.backbone)) & frozen_before
    if not joining:
        return None
    rate = max(schedule.lr_factor(group, start) for group in joining)
    # The ramp is phase_warmup_epochs (at most a third of the phase) rounded to whole steps:
    # a short phase of few steps can get none.
    steps = run.steps_per_epoch
    warm = schedule.warmup_factor(start * steps, steps) < 1.0
    if rate <= SAFE_UNFROZEN_LR_MULT and warm:
        return None
    how = f"at {rate:g}x train.lr" + ("" if warm else " with no warmup")
    return (
        f"warning: phase {phase} fine-tunes pretrained groups the earlier phases kept frozen "
        f"{how}; with AdamW this made the first fine-tune epoch lose 15 points of accuracy "
        f"(docs/quality.md). The defaults, schedule.unfrozen_lr_mult: {UNFROZEN_LR_MULT:g} and "
        "schedule.phase_warmup_epochs: 3, avoid it; a source trained on images like yours "
        "may need the full rate (recipes/digits_transfer.yaml)."
    )


def _norm_note(run: RunSetup) -> str | None:
    """At a phase change: what batch norm does, and a warning where a setting risks collapse."""
    trains = any(p.requires_grad for p in run.backbone.parameters())
    updating = [
        m for m in run.backbone.model.modules()
        if getattr(m, "track_running_stats", False) and m.training
    ]  # fmt: skip
    if not trains or not (updating or run.schedule.freeze_norm_stats):
        return None
    if not updating:
        return "batch norm: running statistics stay fixed while groups train (schedule.norm_stats)"
    if run.recipe.model.weights and run.cfg.batch_size < 32:
        return (
            f"warning: this phase updates batch-norm statistics from batches of "
            f"{run.cfg.batch_size} images while fine-tuning pretrained weights; accuracy often "
            "falls at the unfreeze (docs/quality.md). Set schedule.norm_stats: auto or frozen."
        )
    return None


def cached_loaders(run: RunSetup) -> tuple[DataLoader, DataLoader]:
    """Loaders over backbone features computed once (or read from the shared cache), batched
    and shuffled like the image ones."""
    acc, cfg, folder = run.accelerator, run.cfg, run.run_dir.feature_cache_dir
    args = {"batch_size": cfg.eval_batch_size or cfg.batch_size, "num_workers": run.workers,
            "device": acc.device, "max_gb": cfg.feature_cache_max_gb, "accelerator": acc}  # fmt: skip
    if cfg.feature_cache_shared:
        store = FeatureStore(cache_root(cfg.feature_cache_dir), cfg.feature_cache_limit_gb)
        name = backbone_id(run.recipe.model.backbone, run.recipe.model.kwargs)
        protect: set[str] = set()  # building the second entry never evicts the first
        (train_cache, hit), (val_cache, val_hit) = (
            shared_cache(store, run.backbone, name, split, **args, protect=protect)
            for split in (run.train_set, run.val_set)
        )
        said = f"{'read from' if hit and val_hit else 'computed once into'} the shared cache ({store.root})"
    else:
        train_cache = build_cache(run.backbone, run.train_set, **args,
                                                disk_dir=folder / "train")  # fmt: skip
        val_cache = build_cache(run.backbone, run.val_set, **args,
                                              disk_dir=folder / "validation")  # fmt: skip
        hit, said = False, "computed for this run"
    if acc.is_main_process:
        count, processes = len(train_cache), acc.num_processes
        if processes > 1 and not hit:
            said += (f", each of {processes} processes computing its shard of the {count} training "
                     f"rows ({len(shard_rows(count, 0, processes))} here)")  # fmt: skip
        print(f"features: {said}")
    last = drop_last(len(train_cache), cfg.batch_size, acc.num_processes)
    # The balanced sampler draws row numbers, which the cache keeps (its rows are the images').
    train_loader = DataLoader(train_cache, batch_size=cfg.batch_size, shuffle=run.sampler is None,
                              sampler=run.sampler, drop_last=last, collate_fn=collate)  # fmt: skip
    val_loader = DataLoader(
        val_cache, batch_size=cfg.eval_batch_size or cfg.batch_size, collate_fn=collate
    )
    return acc.prepare_data_loader(train_loader), acc.prepare_data_loader(val_loader)


def _footprint(run: RunSetup) -> dict:
    """What this phase trains and the peak memory so far (CUDA allocator, else process RSS)."""
    import resource

    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    acc = run.accelerator
    counts = torch.tensor(
        [g["trainable_params"] for g in run.backbone.group_summary()]
        + [sum(p.numel() for p in run.model.parameters() if p.requires_grad)],
        device=acc.device,
    )
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        # FSDP1's parameters are views of this process's shard: add up the shards' counts.
        counts = acc.reduce(counts, reduction="sum")
    return {
        "trainable_groups": int((counts[:-1] > 0).sum()),
        "trainable_params": int(counts[-1]),
        "peak_memory_mb": round(peak_mb, 1),
    }


def _save_model(run: RunSetup, epoch: int) -> None:
    """model.safetensors and model.json, written by the main process. Under FSDP each process
    holds only a shard of the weights: every process takes part in gathering the full state
    dict onto the main one (`get_state_dict`, a collective), which writes it."""
    acc = run.accelerator
    if acc.distributed_type == DistributedType.FSDP:
        weights = acc.get_state_dict(run.model)
        if acc.is_main_process:
            # FSDP2 on a CPU returns views into its all-gather buffer, which safetensors
            # refuses to save (shared storage): copy those.
            weights = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone()
                       for k, v in weights.items()}  # fmt: skip
            run.run_dir.save_model(_GatheredWeights(weights), _info(run, epoch))
    elif acc.is_main_process:
        final = run.ema.module if run.ema is not None and run.cfg.ema.final_model else None
        model = final or acc.unwrap_model(run.model)
        run.run_dir.save_model(model, _info(run, epoch))
        if model.backbone.adapter is not None:  # also peft's own files, to share the adapter
            run.run_dir.save_adapter(*adapter_state(model.backbone))


class _GatheredWeights(torch.nn.Module):
    """Stands in for the model when saving: its state dict is the one gathered under FSDP."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.weights = weights

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.weights


def _info(run: RunSetup, epoch: int) -> dict:
    """model.json: what `transferkit.load` needs to rebuild the model, and its epoch."""
    model = run.accelerator.unwrap_model(run.model)
    recipe = run.recipe
    return {
        "backbone": recipe.model.backbone,
        "model_kwargs": recipe.model.kwargs,
        "tasks": [spec.to_dict() for spec in model.tasks.values()],
        "aux_heads": [spec.to_dict() for spec in model.aux_specs],
        "data_config": model.backbone.data_config.to_dict(),
        "image_size": recipe.data.image_size,
        "epoch": epoch,
        "monitor": monitored(run.monitor, run.cfg.ema),
        "adapter": model.backbone.adapter.spec.to_dict() if model.backbone.adapter else None,
        "ema": bool(run.cfg.ema and run.cfg.ema.final_model),  # these weights are the average
        # Test-time augmentation: the views eval and predict use, and whether flips are allowed.
        "tta": list(recipe.data.tta),
        "horizontal_flip": recipe.data.horizontal_flip,
    }


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
