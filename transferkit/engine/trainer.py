"""`train(recipe)`: one fine-tuning run, from recipe to a complete run folder.

    run_dir = claim the folder                  # a new one, or the one to resume
    run = build_run(recipe, accelerator)        # build.py: model, data, optimizer, schedule...
    recipe.yaml, origin.json                    # written once, with the defaults chosen
    for epoch in epochs:
        phase = schedule.apply(epoch)           # freeze as the phase says (phases.py)
        stats = loop.epoch(loader, state)       # loop.py: the steps
        values = evaluate(...)                  # evaluation.py
        record, keep the best model, checkpoint, stop early?
    model card, then complete.json              # written last

Accelerate is used through a few explicit calls (`prepare`, `accumulate`, `backward`,
`gather_for_metrics`, `save_state`/`load_state`); the freeze schedule, the balancer and the EMA
are checkpointed through `register_for_checkpointing`, so a resumed run re-derives its phase
from the epoch; `TrainerState` (state.py) is the loop's position and the best epoch.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from transferkit.core import MEAN_SCORE
from transferkit.engine.accelerator import make_accelerator
from transferkit.engine.batches import StreamLoader, release_workers
from transferkit.engine.build import RunSetup, build_run
from transferkit.engine.checkpoint import load_checkpoint, save_checkpoint
from transferkit.engine.ema import PREFIX as EMA_PREFIX
from transferkit.engine.ema import monitored
from transferkit.engine.evaluation import evaluate
from transferkit.engine.loop import TrainLoop
from transferkit.engine.metrics import mean_score
from transferkit.engine.phases import enter_phase
from transferkit.engine.saving import (
    card_facts,
    disk_full_error,
    footprint,
    is_disk_full,
    save_model,
    write_card,
)
from transferkit.engine.state import TrainerState
from transferkit.engine.stopping import StopRequest
from transferkit.engine.tracking import start_trackers
from transferkit.errors import Interrupted, UserError
from transferkit.recipes import Recipe, ResolvedRecipe, save_recipe
from transferkit.rundir import RunDir, checkpoint_name, render_curves


def train(
    recipe: Recipe | ResolvedRecipe,
    output: str | None = None,
    resume: str | None = None,
    *,
    overwrite: bool = False,
    device: str | None = None,
    epoch_end: Callable[[dict], bool] | None = None,
) -> Path:
    """Fine-tune as the recipe says; returns the run folder's path (see `RunDir`).

    A `ResolvedRecipe` (`transferkit.recipes.resolve_recipe`, `RunDir.resolved_recipe`) says
    what recipe.yaml records; a plain `Recipe` is recorded as it is (on resume, with the paths
    the run's recipe.yaml already had where they resolve to the same files). The folder is
    claimed for the run's life: a second run into it is refused, and so is a new run into a
    folder that holds one, unless `overwrite` (which clears it first). `device`: auto (a GPU
    when there is one), cpu, cuda or cuda:N. `epoch_end(record)`, called with each epoch's
    record once its checkpoint is saved, ends the run there when it returns True (a search
    pruning a trial: the run finishes as "stopped": "pruned").
    """
    if isinstance(recipe, ResolvedRecipe):
        recipe.check_data()
        recipe, written = recipe.recipe, recipe.written
    else:
        written = RunDir(resume).as_written(recipe) if resume else recipe
    started = time.perf_counter()
    run_dir = RunDir(resume or output or f"{recipe.output_dir}/{recipe.name}")
    acc = make_accelerator(recipe, run_dir, device)
    with _claimed(acc, run_dir, bool(resume), overwrite), StopRequest() as stop:
        run = build_run(recipe, acc)
        main = acc.is_main_process
        if main:
            _record_start(run, run_dir, written, resumed=bool(resume))
        start_trackers(acc, recipe, run_dir, resumed=bool(resume))
        state = TrainerState()
        if resume:
            path, state = load_checkpoint(acc, run_dir)
            if main:
                run_dir.truncate_records(state.epoch if state.epoch_done else state.epoch - 1)
                print(f"resumed from {path} (epoch {state.epoch}, step {state.step})")
        try:
            _train_and_finish(run, run_dir, state, stop, started, epoch_end)
        except Interrupted as interrupted:  # a checkpoint was saved: say how to continue
            interrupted.run_dir = str(run_dir.path)
            acc.end_training()
            raise
        except Exception as err:
            if is_disk_full(err):  # the atomic checkpoints keep the last complete one
                raise disk_full_error(run_dir) from None
            raise
        acc.end_training()
    return run_dir.path


def _train_and_finish(
    run: RunSetup, run_dir: RunDir, state: TrainerState, stop: StopRequest, started: float,
    epoch_end: Callable[[dict], bool] | None = None,
) -> None:  # fmt: skip
    """The epochs, then what a finished run writes: its model (if no epoch saved one), the
    model card, curves.png and, last, complete.json; and a summary on the console."""
    acc, main = run.accelerator, run.accelerator.is_main_process
    try:
        stopped = _epochs(run, run_dir, state, stop, epoch_end)
    finally:
        release_workers(run.train_loader, run.val_loader)
    # The main process decides (other machines may not see its folder), and all take part:
    # under FSDP every process joins in gathering the weights.
    if broadcast_object_list([main and not run_dir.has_model()])[0]:
        save_model(run, run_dir, state.epoch)
    acc.wait_for_everyone()
    if main:  # last: only now does the folder count as a finished run
        summary = {"stopped": stopped, "monitor": monitored(run.monitor, run.cfg.ema),
                   "best": state.best, "best_epoch": state.best_epoch,
                   "epochs": state.epoch + 1, "steps": state.step,
                   "seconds": round(time.perf_counter() - started, 1), "card": card_facts(run)}  # fmt: skip
        write_card(run_dir, summary)
        curves = _draw_curves(run_dir, summary["monitor"])
        run_dir.mark_complete(summary)
        print(_ending(run_dir, summary, curves))


@contextlib.contextmanager
def _claimed(acc: Accelerator, run_dir: RunDir, resume: bool, overwrite: bool) -> Iterator[None]:
    """The main process claims the folder for the run (`RunDir.claimed`) and checks it may
    train there; an error reaches every process, so none waits for the others forever."""
    with contextlib.ExitStack() as stack:
        message = None
        if acc.is_main_process:
            try:
                stack.enter_context(_writable(run_dir).claimed())
                _check_folder(run_dir, resume, overwrite)
            except UserError as err:
                message = str(err)
        if acc.num_processes > 1:
            message = broadcast_object_list([message])[0]
        if message is not None:
            raise UserError(message)
        yield


def _writable(run_dir: RunDir) -> RunDir:
    try:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        probe = run_dir.path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write the run folder {run_dir.path}: {err.strerror}; choose another with --output"
        ) from None
    return run_dir


def _check_folder(run_dir: RunDir, resume: bool, overwrite: bool) -> None:
    """Resume: the folder must have a checkpoint. A new run: the folder must hold none, unless
    it may clear it (`overwrite`)."""
    if resume:
        if not run_dir.checkpoints():
            raise UserError(
                f"--resume {run_dir.path}: no complete checkpoint in {run_dir.checkpoints_dir}"
            )
        return
    if not run_dir.holds_run():
        return
    if not overwrite:
        done = "a finished run" if run_dir.is_complete() else "a run"
        raise UserError(
            f"run folder {run_dir.path} already holds {done}; continue it with "
            f"--resume {run_dir.path}, or start afresh with --overwrite (which clears it)"
        )
    run_dir.clear()


def _epochs(run: RunSetup, run_dir: RunDir, state: TrainerState, stop: StopRequest,
            epoch_end: Callable[[dict], bool] | None = None) -> str:  # fmt: skip
    """Train from `state` to the last epoch (or an earlier stop); returns why it stopped, or
    raises `Interrupted` when a signal asked the run to stop (`stop`)."""
    acc, cfg, schedule = run.accelerator, run.cfg, run.schedule
    main = acc.is_main_process
    first_epoch, resume_batches = state.next_epoch, state.batches_done
    checkpoint = partial(save_checkpoint, acc, run_dir, keep=cfg.keep_checkpoints)
    loop = TrainLoop(accelerator=acc, model=run.model, optimizer=run.optimizer,
                     lr_scheduler=run.lr_scheduler, tasks=run.tasks, cfg=cfg,
                     seed=run.recipe.seed, strategy=run.strategy, checkpoint=checkpoint,
                     regularizers=run.regularizers, ema=run.ema, mixer=run.mixer,
                     distiller=run.distiller, stop=stop)  # fmt: skip
    monitor = monitored(run.monitor, cfg.ema)  # the EMA's metric when it is the final model
    current_phase, loaders = None, (run.train_loader, run.val_loader)
    for epoch in range(first_epoch, cfg.epochs):
        phase = schedule.apply(epoch)
        if main:
            spec = schedule.phases[phase].freeze
            trainable = ", ".join(spec.trainable_groups(run.backbone)) or "heads only"
            print(f"epoch {epoch}: phase {phase} ({spec}), trainable groups: {trainable}")
        state.epoch, state.epoch_done = epoch, False
        if phase != current_phase:
            loaders = enter_phase(run, loop, phase, run_dir.feature_cache_dir)
            current_phase = phase
        train_loader, val_loader = loaders
        run.train_set.epoch = epoch
        train_loader.set_epoch(epoch)
        loader = train_loader
        state.batches = 0
        if epoch == first_epoch and resume_batches:
            state.batches = resume_batches  # mid-epoch resume: skip what was already trained
            loader = (train_loader.skipping(resume_batches) if isinstance(train_loader, StreamLoader)
                      else acc.skip_first_batches(train_loader, resume_batches))  # fmt: skip
        stats = loop.epoch(loader, state)
        values = evaluate(loop.forward_module, val_loader, run.tasks, acc, "val", run.metric_names)
        if run.ema is not None:
            # Cached features come from the raw backbone; once a phase has trained it, the
            # average's own backbone differs, so the average is evaluated on the images.
            ema_loader = run.val_loader if schedule.backbone_trained_by(epoch) else val_loader
            values |= evaluate(run.ema.module, ema_loader, run.tasks, acc, EMA_PREFIX,
                               run.metric_names)  # fmt: skip
        if run.monitor == f"val/{MEAN_SCORE}":  # the epoch ranked by all its tasks at once
            for prefix in ("val", EMA_PREFIX) if run.ema is not None else ("val",):
                values[f"{prefix}/{MEAN_SCORE}"] = mean_score(values, run.tasks, prefix)
        record = {"epoch": epoch, "step": state.step, "phase": phase, **stats, **values,
                  "skipped_steps": state.skipped_steps, **footprint(run)}  # fmt: skip
        record["lr"] = {g["group"]: g["lr"] for g in run.optimizer.param_groups if "group" in g}
        acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state.step)
        early = cfg.early_stopping
        improved = state.update_best(record[monitor], epoch, monitor, cfg.monitor_mode,
                                     early.min_delta if early else 0.0)  # fmt: skip
        state.epoch_done = True
        if improved:
            state.best_checkpoint = checkpoint_name(state.step, True)
        if main:
            run_dir.append_record(record)
            print(_summary(record))
        save_checkpoint(acc, run_dir, state, cfg.keep_checkpoints)
        if improved:
            save_model(run, run_dir, epoch)
        if cfg.max_steps and state.step >= cfg.max_steps:
            return "max_steps"
        if epoch_end is not None:  # every process takes the main one's answer
            asked = broadcast_object_list([main and bool(epoch_end(record))])[0]
            if asked and epoch + 1 < cfg.epochs:
                return "pruned"
        if epoch + 1 < cfg.epochs and _agreed(acc, stop):  # asked between two epochs' steps
            raise Interrupted(stop.signum or signal.SIGINT, state.step, epoch)
        if early and state.bad_epochs >= early.patience:
            if main:
                print(f"early stopping: {monitor} has not improved for {state.bad_epochs} epochs")
            return "early_stopping"
    return "finished"


def _record_start(run: RunSetup, run_dir: RunDir, written: Recipe, resumed: bool) -> None:
    """What the folder says before the first epoch: unfinished again (on resume), the recipe
    with the defaults this run chose, where relative paths start, and skipped images."""
    run_dir.clear_complete()
    save_recipe(run.with_chosen_defaults(written), run_dir.recipe_path)
    if not resumed or run_dir.origin() is None:
        run_dir.write_origin()
    if run.skipped_images:
        run_dir.write_skipped_images(run.skipped_images)
        print(
            f"skipped {len(run.skipped_images)} unreadable images (listed in {run_dir.skipped_images_path})"
        )


def _agreed(acc: Accelerator, stop: StopRequest) -> bool:
    """Whether any process was asked to stop (every process decides the same)."""
    asked = torch.tensor([float(bool(stop.signum))], device=acc.device)
    return bool(acc.reduce(asked, reduction="sum").item() > 0)


def _draw_curves(run_dir: RunDir, monitor: str) -> Path | None:
    """curves.png; a plot that cannot be drawn must not fail a trained run."""
    try:
        return render_curves(run_dir, monitor)
    except Exception as err:  # noqa: BLE001 - matplotlib or file errors: say so and go on
        print(f"warning: {run_dir.curves_path} not drawn: {type(err).__name__}: {err}")
        return None


def _ending(run_dir: RunDir, summary: dict, curves: Path | None) -> str:
    """What a finished run says last: how long it took, its best epoch, its last metrics."""
    minutes, seconds = divmod(round(summary["seconds"]), 60)
    took = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    lines = [f"done in {took}: {summary['epochs']} epochs, {summary['steps']} steps "
             f"({summary['stopped'].replace('_', ' ')})"]  # fmt: skip
    if summary["best"] is not None:
        lines.append(f"best: epoch {summary['best_epoch']}, {summary['monitor']} "
                     f"{summary['best']:.4f} (the saved model)")  # fmt: skip
    last = run_dir.records()[-1] if run_dir.records() else {}
    shown = [f"{k} {v:.4f}" for k, v in last.items()
             if k.startswith("val/") and not k.endswith("/count") and isinstance(v, float)]  # fmt: skip
    if shown:
        lines.append(f"last epoch ({last['epoch']}): " + " | ".join(shown))
    lines.append(f"run folder: {run_dir.path}" + (f" (curves: {curves.name})" if curves else ""))
    return "\n".join(lines)


def _summary(record: dict) -> str:
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
