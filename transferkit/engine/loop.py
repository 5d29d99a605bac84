"""The step loop of one epoch: forward -> task losses -> strategy.backward -> optimizer step.

One path for every method (see `strategies.py`). Around it, small hooks: a step checkpoint
every `train.checkpoint_every` steps, step logging, and the non-finite-loss policy.
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

    def epoch(self, loader: DataLoader, state: TrainerState) -> dict[str, float | None]:
        acc, cfg, strategy = self.accelerator, self.cfg, self.strategy
        self.model.train()
        start, seen, running = time.perf_counter(), 0, None
        totals: dict[str, float] = {}  # per-task weights and gradient cosines, epoch means
        counts: dict[str, int] = {}
        progress = Progress(_length(loader), f"epoch {state.epoch}", "batch", acc.is_main_process)
        stopping = False
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
                finite, stopping = self._check(loss)
                if not finite:
                    self._nonfinite(losses, state)
                    continue
                strategy.backward(loss, losses, batch, position, penalty)
                if cfg.clip_grad and acc.sync_gradients:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    strategy.after_step(batch)
            seen += batch["index"].shape[0] * acc.num_processes
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            rate = seen / (time.perf_counter() - start)
            progress.update(1, loss=f"{running:.4f}", images_per_s=f"{rate:.0f}")
            if not acc.sync_gradients:
                continue
            state.step += 1
            if self.ema is not None:  # the step number drives its warmup: replayed on resume
                self.ema.update(acc.unwrap_model(self.model), step=state.step)
            balance = strategy.log_values()
            if self.regularizers:
                balance.update(self.regularizers.values)
            for key, value in balance.items():
                totals[key] = totals.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            if state.step % cfg.log_every == 0:
                acc.log(
                    {
                        "train/loss": loss.item(),
                        **{f"train/loss_{k}": v.item() for k, v in losses.items()},
                        **{f"train/{k}": v for k, v in balance.items()},
                        **{
                            f"train/lr/{g['group']}": g["lr"]
                            for g in self.optimizer.param_groups
                            if "group" in g
                        },  # fmt: skip
                    },
                    step=state.step,
                )
            saved = bool(cfg.checkpoint_every) and state.step % cfg.checkpoint_every == 0
            if self.checkpoint and saved:
                self.checkpoint(state)
            if stopping:
                progress.close()
                self._stopped(state, saved)
            if cfg.max_steps and state.step >= cfg.max_steps:
                break
        progress.close()
        elapsed = time.perf_counter() - start
        strategy.end_epoch()
        return {
            "train/loss": running,
            "epoch_time_s": round(elapsed, 3),
            "images_per_s": round(seen / max(elapsed, 1e-9), 1),
            **{k: round(v / counts[k], 6) for k, v in totals.items()},
        }

    def _check(self, loss) -> tuple[bool, bool]:
        """Whether every process's loss is finite, and whether any was asked to stop: one
        reduction, so that every process takes the same decisions (or DDP's all-reduce would
        hang on the one that went another way)."""
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
        bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["(another process)"]
        where = f"epoch {state.epoch}, step {state.step + 1} (batch {state.batches})"
        if self.cfg.nonfinite == "stop":
            raise UserError(
                f"non-finite loss for task {', '.join(bad)} at {where}; lower train.lr, check that "
                "task's labels, or set train.nonfinite: skip. The last good checkpoint is kept."
            )
        state.skipped_steps += 1
        # The whole accumulation window is dropped: the gradients, and any strategy state.
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.discard()
        if self.accelerator.is_main_process:
            print(f"skipped a step with a non-finite loss for {', '.join(bad)} at {where}")


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length
        return None
