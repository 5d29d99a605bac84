"""The step loop of one epoch: forward -> task losses -> strategy.backward -> optimizer step.

One path for every method (see `strategies.py`). Around it, small hooks: a step checkpoint
every `train.checkpoint_every` steps, step logging, and the non-finite-loss policy.

The loop does not wait on the device between its check points (every `train.log_every` steps,
a step checkpoint, a stop, the epoch's end): losses and non-finite flags stay on the device
(`tally.py`) and are read there in one transfer. So under `train.nonfinite: stop` the run stops
at the check point after the first non-finite loss, before any checkpoint is written past it;
under `skip`, a fused optimizer skips the step on the device (the step still counts, and the
learning-rate schedule moves on). A balancer that keeps per-step state reads the device every
step anyway, so with one the loop checks every step too, under either policy (a balancer must
not be fed a non-finite loss); so does `skip` where the optimizer cannot skip on the device
(fp16's GradScaler, FSDP, an optimizer saved unfused).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from timm.utils.model_ema import ModelEmaV3
from torch.utils.data import DataLoader

from transferkit.core import Progress, TaskSpec, derive_seed
from transferkit.engine.distill import Distiller
from transferkit.engine.forward import model_outputs
from transferkit.engine.losses import multitask_loss
from transferkit.engine.mixing import TaskMixer
from transferkit.engine.regularizers import Regularizers
from transferkit.engine.state import TrainerState
from transferkit.engine.stopping import StopRequest
from transferkit.engine.strategies import PlainSum, Strategy
from transferkit.engine.tally import Reading, StepTally, as_floats
from transferkit.errors import Interrupted, UserError
from transferkit.recipes import TrainSection


class TrainLoop:
    """The training steps of one epoch (public for the benchmarks, which time it against a
    hand-written loop). `state` (epoch, batches, step, skipped_steps) is updated as it goes."""

    def __init__(
        self,
        *,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        tasks: dict[str, TaskSpec],
        cfg: TrainSection,
        seed: int,
        strategy: Strategy | None = None,
        checkpoint: Callable[[TrainerState], None] | None = None,
        regularizers: Regularizers | None = None,
        ema: ModelEmaV3 | None = None,
        mixer: TaskMixer | None = None,
        distiller: Distiller | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.lr_scheduler, self.tasks, self.cfg, self.seed = lr_scheduler, tasks, cfg, seed
        self.strategy = strategy or PlainSum(accelerator, {})
        self.checkpoint = checkpoint  # saves a step checkpoint (train.checkpoint_every)
        self.regularizers = regularizers
        self.forward_module = model  # the compiled model when train.compile is on
        self.ema, self.mixer = ema, mixer  # train.ema, train.mixup
        self.distiller = distiller  # distill: the teacher's outputs as a second target
        self.stop = stop  # Ctrl-C or SIGTERM asked the run to stop at a step boundary
        inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        # `skip` on the device: the optimizer reads a found_inf flag and skips its step there.
        self.skips_on_device = (
            cfg.nonfinite == "skip"
            and self.strategy.skips_on_device
            and getattr(inner, "_step_supports_amp_scaling", False)  # fused AdamW, SGD
            # (checked per group too: a resumed run takes its groups' settings, `fused` among
            # them, from the checkpoint, which an older run may have saved unfused)
            and all(g.get("fused") for g in inner.param_groups)
            and getattr(optimizer, "scaler", None) is None  # fp16's GradScaler sets its own
            and not any(g.get("dampening") for g in inner.param_groups)  # see _zero_momentum
        )
        # Read every step where only the host can skip, and wherever a balancer keeps state:
        # it reads every step anyway, and must not be fed a non-finite loss under `stop`.
        self.reads_every_step = not self.skips_on_device and (
            cfg.nonfinite == "skip" or not self.strategy.skips_on_device
        )
        self._inner_optimizer = inner
        self._dropping = False  # the rest of a window whose loss was not finite is dropped
        if self.skips_on_device:
            _zero_momentum(inner)

    def epoch(self, loader: DataLoader, state: TrainerState) -> dict[str, float | None]:
        acc, cfg, strategy = self.accelerator, self.cfg, self.strategy
        self.model.train()
        start, seen, reading = time.perf_counter(), 0, None
        tally = StepTally(acc)
        totals: dict[str, torch.Tensor | float] = {}  # per-task weights, cosines: epoch means
        counts: dict[str, int] = {}
        progress = Progress(_length(loader), f"epoch {state.epoch}", "batch", acc.is_main_process)
        loss_shown = "..."  # the loss as of the last read
        stopping = asked = False
        for batch in loader:
            # Dropout and other in-model randomness depend on the position only, so a run
            # resumed at any step replays them exactly (saved RNG states would not survive the
            # draws that creating a data iterator makes).
            torch.manual_seed(derive_seed(self.seed, state.epoch, state.batches, acc.process_index))
            state.batches += 1
            position = (state.epoch, state.batches)
            if self.mixer is not None:
                batch = self.mixer(batch, *position)
            with acc.accumulate(self.model):
                if self._dropping:  # the window's earlier loss was not finite: all of it goes
                    self._dropping = not acc.sync_gradients
                    continue
                with strategy.forward_context(self.model):
                    outputs = model_outputs(self.forward_module, batch, cfg.channels_last)
                _, losses = multitask_loss(outputs, batch["targets"], batch["mask"], self.tasks,
                                           strategy.weights, strategy.loss_options)  # fmt: skip
                if self.distiller is not None:
                    losses = self.distiller.combine(outputs, batch, losses)
                loss = strategy.loss(losses, batch, position)
                penalty = self.regularizers.penalty(batch) if self.regularizers else None
                if penalty is not None:
                    loss = loss + penalty
                if self.reads_every_step:  # skip, where only the host can skip: a read a step
                    finite, stopping = self._check(loss)
                    if not finite:
                        self._nonfinite(losses, state)
                        continue
                tally.add(loss, losses)
                strategy.backward(loss, losses, batch, position, penalty)
                if cfg.clip_grad and acc.sync_gradients:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                if self.skips_on_device and acc.sync_gradients:
                    self._inner_optimizer.found_inf = tally.close_window()
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    strategy.after_step(batch)
            seen += batch["index"].shape[0] * acc.num_processes
            rate = seen / (time.perf_counter() - start)
            progress.update(1, loss=loss_shown, images_per_s=f"{rate:.0f}")
            if not acc.sync_gradients:
                continue
            state.step += 1
            tally.step_done()
            if self.ema is not None:  # the step number drives its warmup: replayed on resume
                self.ema.update(acc.unwrap_model(self.model), step=state.step)
            balance = strategy.log_values()
            if self.regularizers:
                balance.update(self.regularizers.values)
            for key, value in balance.items():
                totals[key] = totals.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            logged = state.step % cfg.log_every == 0
            saved = bool(cfg.checkpoint_every) and state.step % cfg.checkpoint_every == 0
            last = bool(cfg.max_steps) and state.step >= cfg.max_steps
            if not self.reads_every_step:  # (that path's `_check` has agreed on `stopping`)
                asked = bool(self.stop and self.stop.signum)  # a host flag: no read
                stopping = asked and acc.num_processes == 1  # several agree at a check point
            if logged or saved or last or stopping:  # a check point: the one read
                # (A step always follows a recorded micro-batch, so there is one to read.)
                reading = self._read(tally, state, asked=stopping or asked) or reading
                stopping = stopping or bool(reading and reading.stopping)
                loss_shown = f"{reading.running:.4f}" if reading else loss_shown
            if logged and reading is not None:
                acc.log(
                    {
                        "train/loss": reading.loss,
                        **{f"train/loss_{k}": v for k, v in reading.losses.items()},
                        **{f"train/{k}": v for k, v in as_floats(balance).items()},
                        **{
                            f"train/lr/{g['group']}": g["lr"]
                            for g in self.optimizer.param_groups
                            if "group" in g
                        },  # fmt: skip
                    },
                    step=state.step,
                )
            if self.checkpoint and saved:
                self.checkpoint(state)
            if stopping:
                progress.close()
                self._stopped(state, saved)
            if last:
                break
        if tally.steps_unread or reading is None:  # the epoch's end is a check point too
            reading = self._read(tally, state, asked=False) or reading
        progress.close()
        elapsed = time.perf_counter() - start
        strategy.end_epoch()
        means = as_floats({k: v / counts[k] for k, v in totals.items()})
        return {
            "train/loss": reading.running if reading else None,
            "epoch_time_s": round(elapsed, 3),
            "images_per_s": round(seen / max(elapsed, 1e-9), 1),
            **{k: round(v, 6) for k, v in means.items()},
        }

    def _read(self, tally: StepTally, state: TrainerState, asked: bool) -> Reading | None:
        """A check point: read the steps since the last one, count the steps the optimizer
        skipped, and stop the run on a non-finite loss under `train.nonfinite: stop`."""
        first = state.step - tally.steps_unread + 1
        reading = tally.read(asked)
        if reading is None:
            return None
        state.skipped_steps += reading.skipped
        if not reading.nonfinite:
            return reading
        tasks = [k for k in reading.nonfinite if k != "loss"] or ["(the regularizer penalty)"]
        where = (f"epoch {state.epoch}, step {state.step}" if first >= state.step else
                 f"epoch {state.epoch}, between step {first} and step {state.step} (losses "
                 "are read every train.log_every steps)")  # fmt: skip
        if self.cfg.nonfinite == "stop":
            raise _nonfinite_error(tasks, where)
        if reading.skipped and self.accelerator.is_main_process:
            print(f"skipped {reading.skipped} step(s) with a non-finite loss for "
                  f"{', '.join(tasks)} at {where}")  # fmt: skip
        return reading

    def _check(self, loss) -> tuple[bool, bool]:
        """The per-step read (`reads_every_step`): whether every process's loss
        is finite, and whether any was asked to stop, read every step. One reduction, so that
        every process takes the same decisions (or DDP's all-reduce would hang on the one that
        went another way)."""
        asked = float(bool(self.stop and self.stop.signum))
        flags = torch.stack([torch.isfinite(loss.detach()).float().reshape(()),
                             loss.new_tensor(asked, dtype=torch.float32)])  # fmt: skip
        finite, stopping = self.accelerator.reduce(flags, reduction="sum").tolist()
        return finite == self.accelerator.num_processes, stopping > 0

    def _stopped(self, state: TrainerState, saved: bool) -> None:
        """Stop at this step boundary: save a checkpoint here (unless one was just saved) and
        raise `Interrupted`; a resume continues from this very step."""
        if self.checkpoint and not saved:
            self.checkpoint(state)
        signum = (self.stop.signum if self.stop else 0) or signal.SIGINT  # another process's
        raise Interrupted(signum, state.step, state.epoch)

    def _nonfinite(self, losses: dict, state: TrainerState) -> None:
        """A non-finite loss read on the host: stop, or drop this accumulation window."""
        bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["(another process)"]
        where = f"epoch {state.epoch}, step {state.step + 1} (batch {state.batches})"
        if self.cfg.nonfinite == "stop":
            raise _nonfinite_error(bad, where)
        state.skipped_steps += 1
        # The whole accumulation window is dropped: the gradients so far (through the inner
        # optimizer: Accelerate's wrapper zeroes only at a window's end), any strategy state,
        # and the window's micro-batches still to come.
        self._inner_optimizer.zero_grad(set_to_none=True)
        self.strategy.discard()
        self._dropping = not self.accelerator.sync_gradients
        if self.accelerator.is_main_process:
            print(f"skipped a step with a non-finite loss for {', '.join(bad)} at {where}")


def _nonfinite_error(tasks: list[str], where: str) -> UserError:
    return UserError(
        f"non-finite loss for task {', '.join(tasks)} at {where}; lower train.lr, check that "
        "task's labels, or set train.nonfinite: skip. The last good checkpoint is kept."
    )


def _zero_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Momentum buffers of zeros, made before the first step: torch's fused SGD allocates them
    uninitialized at its first step and, when that step is skipped (found_inf), keeps them so.
    With no dampening a zero buffer gives the first step's own result (0 * m + g = g). Frozen
    parameters get one too (a momentum copy of the model): fused SGD cannot take a mix of
    buffers and none, as a phase that unfreezes a group would give it."""
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.SGD) and group.get("momentum"):
            for param in group["params"]:
                optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length
        return None
