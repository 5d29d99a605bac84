"""What changes at a phase boundary: compile again, train the heads from cached features
when the backbone is frozen and deterministic, and say in the log what batch norm does and
whether the new phase starts pretrained groups at a rate that made LP-FT collapse."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from transferkit.data import collate
from transferkit.engine.batches import StreamLoader, drop_last
from transferkit.engine.build import RunSetup, only_adapter_trains
from transferkit.engine.loop import TrainLoop
from transferkit.engine.schedule import UNFROZEN_LR_MULT
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


def enter_phase(
    run: RunSetup, loop: TrainLoop, phase: int, feature_dir: Path
) -> tuple[DataLoader, DataLoader]:
    """A new phase: compile again if asked, and train from cached features when it can (kept
    in the shared cache, or in `feature_dir` when the recipe keeps them in the run folder)."""
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
    if use_cache and isinstance(run.train_loader, StreamLoader):
        if cfg.feature_cache == "force":
            raise UserError(
                f"train.feature_cache: force, but phase {phase} trains from a stream, which is "
                "not read ahead to fill a cache; use auto or forbid"
            )
        use_cache, why = False, "features: computed every step (the training split streams)"
    if use_cache and run.mixer is not None:
        if cfg.feature_cache == "force":
            raise UserError(
                "train.feature_cache: force, but train.mixup mixes images, which cached features "
                "are not; use auto or forbid, or remove train.mixup"
            )
        use_cache, why = False, "features: computed every step (train.mixup mixes the images)"
    if run.accelerator.is_main_process:
        print(why)
        for note in (_norm_note(run), rate_note(run, phase)):
            if note:
                print(note)
    if cfg.compile:
        # A compiled graph keeps the requires_grad it was traced with, so a group unfrozen
        # later would silently not train (pytorch #139476): compile again for each phase.
        torch._dynamo.reset()
        loop.forward_module = torch.compile(run.model, backend=cfg.compile_backend)
    if not use_cache:
        return run.train_loader, run.val_loader
    return cached_loaders(run, feature_dir)


# Above this multiplier, or with no warmup, AdamW's first steps on pretrained groups unfrozen
# after a probe cost 15 points of validation accuracy in the first fine-tune epoch
# (docs/quality.md); at 0.25 with a warmup, a few points at most.
SAFE_UNFROZEN_LR_MULT = 0.3


def rate_note(run: RunSetup, phase: int) -> str | None:
    """At a phase change: a warning when pretrained groups that an earlier phase kept frozen
    start training at a rate that made LP-FT collapse."""
    schedule = run.schedule
    if not run.recipe.model.weights or run.cfg.optimizer != "adamw" or phase == 0:
        return None
    if only_adapter_trains(run.recipe):  # no pretrained weight moves
        return None
    start = schedule.phases[phase].from_epoch
    earlier = set().union(
        *(p.freeze.trainable_groups(run.backbone) for p in schedule.phases[:phase])
    )
    frozen_before = set(run.backbone.group_names) - earlier
    joining = set(schedule.phases[phase].freeze.trainable_groups(run.backbone)) & frozen_before
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


def cached_loaders(run: RunSetup, disk_dir: Path) -> tuple[DataLoader, DataLoader]:
    """Loaders over backbone features computed once (or read from the shared cache), batched
    and shuffled like the image ones; features kept apart from the shared cache (and too large
    for memory) go to `disk_dir`."""
    acc, cfg, folder = run.accelerator, run.cfg, disk_dir
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
