"""How the task losses of a micro-batch become gradients: one strategy per kind of method.

The step loop calls the same methods whatever the strategy, and never branches on its kind:

    loss = strategy.loss(losses, batch, position)     # the scalar that is logged and checked
    strategy.backward(loss, losses, batch, position, penalty)  # gradients into `.grad`
    ... optimizer.step() ...
    strategy.after_step(batch)                        # at the end of an accumulation window
    strategy.end_epoch(); strategy.log_values()       # per epoch; per step, for the records

Every strategy is built once per run with what it needs (`build_strategy`): the model, the
tasks, the static weights, each task's loss options and the balancer.

A regularizer's penalty (`regularizers.py`) is already in `loss`, and passed apart as well:
the loss-based strategies back-propagate `loss`; the Jacobian one adds the penalty's gradient to
the aggregated direction, unbalanced.

- `PlainSum`: the weighted sum of task losses, one `accelerator.backward`.
- `CombinedLoss`: a loss-based balancer (UW, DWA, FAMO, ...) turns the loss vector into the
  scalar; one `accelerator.backward`.
- `JacobianAggregation`: a gradient-based balancer (MGDA, PCGrad, UPGrad, ...). Each micro-batch
  adds its per-task gradients of the trainable backbone to a window; at the end of the window
  the Jacobian is averaged over processes and aggregated into one direction. The forward runs
  under DDP's `no_sync`, since this strategy writes the gradients itself.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torch import Tensor

from transferkit.balancing import objective_gradients, write_direction
from transferkit.core import TaskSpec, task_of
from transferkit.engine.forward import model_outputs
from transferkit.engine.losses import LossOptions, multitask_loss, weighted_sum

if TYPE_CHECKING:  # imported where a balancer is built: torchjd is slow to import
    from transferkit.balancing import Balancer


class PlainSum:
    """Static task weights (`tasks.NAME.weight`), summed."""

    # Nothing but the optimizer changes at a step, so a fused optimizer can skip a non-finite
    # step on the device (`train.nonfinite: skip`, see `loop.py`).
    skips_on_device = True

    def __init__(
        self,
        accelerator: Accelerator,
        weights: dict[str, float],
        loss_options: dict[str, LossOptions] | None = None,
    ) -> None:
        self.accelerator, self.weights = accelerator, weights
        self.loss_options = dict(loss_options or {})  # per task: smoothing, class weights, focal

    def forward_context(self, model):
        return contextlib.nullcontext()

    def loss(self, losses: dict[str, Tensor], batch: dict, position: tuple) -> Tensor:
        return weighted_sum(losses, self.weights)

    def backward(
        self, loss: Tensor, losses: dict, batch: dict, position: tuple, penalty=None
    ) -> None:
        self.accelerator.backward(loss)

    def discard(self) -> None:
        """A skipped (non-finite) step: nothing is kept outside `.grad`."""

    def after_step(self, batch: dict) -> None:
        """Nothing to do after the optimizer step."""

    def end_epoch(self) -> None:
        """No state across epochs."""

    def log_values(self) -> dict[str, float]:
        return {}


class _Balanced(PlainSum):
    """What both balanced strategies share: the balancer and labelled-task flags."""

    skips_on_device = False  # the balancer's state moves at every step: a skip is the host's

    def __init__(
        self,
        accelerator: Accelerator,
        weights: dict[str, float],
        loss_options: dict[str, LossOptions] | None,
        balancer: Balancer,
    ) -> None:
        super().__init__(accelerator, weights, loss_options)
        self.balancer = balancer

    def present(self, batch: dict, local: Tensor) -> Tensor:
        """Which objectives have a label anywhere in the global batch (the same on every rank)."""
        masks = batch["mask"]
        flags = torch.tensor(
            [bool(p) and bool(masks[task_of(k)].any())
             for k, p in zip(self.balancer.objectives, local.tolist())],
            dtype=torch.float32, device=self.accelerator.device,
        )  # fmt: skip
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        return flags > 0

    def end_epoch(self) -> None:
        self.balancer.end_epoch()

    def log_values(self) -> dict[str, float]:
        values = {f"mtl/weight/{k}": v for k, v in self.balancer.weights_dict().items()}
        values.update({f"mtl/cos/{k}": v for k, v in self.balancer.cosines_dict().items()})
        return values


class CombinedLoss(_Balanced):
    """A loss combiner makes the scalar; one ordinary backward pass. FAMO also sees the batch's
    losses after the update, from one extra forward pass of `model` (`after_step`)."""

    def __init__(
        self,
        accelerator: Accelerator,
        weights: dict[str, float],
        loss_options: dict[str, LossOptions] | None,
        balancer: Balancer,
        model: torch.nn.Module,
        tasks: dict[str, TaskSpec],
        channels_last: bool = False,
    ) -> None:
        super().__init__(accelerator, weights, loss_options, balancer)
        self.model, self.tasks, self.channels_last = model, tasks, channels_last

    def loss(self, losses: dict[str, Tensor], batch: dict, position: tuple) -> Tensor:
        vector, present = self.balancer.stack(losses)
        return self.balancer.combine(vector, self.present(batch, present), *position)

    def backward(
        self, loss: Tensor, losses: dict, batch: dict, position: tuple, penalty=None
    ) -> None:
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and self.accelerator.num_processes > 1:
            # UW / IMTL-L parameters live outside the DDP model: average their gradients here.
            for param in self.balancer.learnable_parameters():
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    def after_step(self, batch: dict) -> None:
        """FAMO: the same batch's losses after the update (no gradient; BatchNorm statistics
        and the random stream are restored, so the extra forward changes nothing else)."""
        if not self.balancer.needs_losses_after_step:
            return
        model = self.accelerator.unwrap_model(self.model)
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            outputs = model_outputs(model, batch, self.channels_last)
            _, losses = multitask_loss(outputs, batch["targets"], batch["mask"], self.tasks,
                                       self.weights, self.loss_options)  # fmt: skip
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        vector, present = self.balancer.stack(losses)
        self.balancer.after_step(vector, self.present(batch, present))


class JacobianAggregation(_Balanced):
    """Per-task gradients of the trainable backbone, aggregated at the end of each window."""

    def __init__(
        self,
        accelerator: Accelerator,
        weights: dict[str, float],
        loss_options: dict[str, LossOptions] | None,
        balancer: Balancer,
        model: torch.nn.Module,
    ) -> None:
        super().__init__(accelerator, weights, loss_options, balancer)
        self.model = model
        self._window: dict | None = None  # Jacobians accumulated over micro-batches

    def forward_context(self, model):
        return self.accelerator.no_sync(model)  # gradients are written here, not by DDP

    def discard(self) -> None:
        """A skipped step drops the whole window, as `optimizer.zero_grad` drops `.grad`."""
        self._window = None

    def _shared(self):
        model = self.accelerator.unwrap_model(self.model)
        return model, [p for p in model.backbone.parameters() if p.requires_grad]

    def backward(
        self, loss: Tensor, losses: dict, batch: dict, position: tuple, penalty=None
    ) -> None:
        self._accumulate(losses, batch, penalty)
        if self.accelerator.sync_gradients:
            self._aggregate(position)

    def _penalty_gradient(self, penalty, model, shared: list, scale: float) -> Tensor | None:
        """The penalty's gradient: added to `.grad` of the heads, returned flat for the shared
        parameters (before the objectives' backward passes free the graph)."""
        if penalty is None or not penalty.requires_grad:
            return None
        shared_ids = {id(p) for p in shared}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
        factor = scale / self.accelerator.gradient_accumulation_steps
        grads = torch.autograd.grad(
            penalty * factor, [*shared, *rest], retain_graph=True, allow_unused=True
        )
        for param, grad in zip(rest, grads[len(shared) :]):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad
        flat = [
            (torch.zeros_like(p) if g is None else g).reshape(-1).float()
            for p, g in zip(shared, grads[: len(shared)])
        ]
        return torch.cat(flat) if flat else None

    def _accumulate(self, losses: dict, batch: dict, penalty=None) -> None:
        """Add this micro-batch's per-objective gradients to the accumulation window."""
        acc, balancer = self.accelerator, self.balancer
        model, shared = self._shared()
        keys = [k for k in balancer.objectives if k in losses]
        objectives, scale = [losses[k] for k in keys], 1.0
        if acc.scaler is not None:
            # fp16, as `accelerator.backward` does: through the scaler, whose scale its first
            # `scale()` creates (`optimizer.step()` refuses to run without it).
            objectives = [acc.scaler.scale(loss) for loss in objectives]
            scale = acc.scaler.get_scale()
        regularized = self._penalty_gradient(penalty, model, shared, scale)
        own = [list(model.head_of(k).parameters()) for k in keys]
        # As `accelerator.backward` does: divide by the accumulation steps.
        factor = 1.0 / acc.gradient_accumulation_steps
        rows, own_grads = objective_gradients(objectives, shared, own, factor)
        jacobian = rows.new_zeros(len(balancer.objectives), rows.shape[1])
        index = torch.tensor([balancer.objectives.index(k) for k in keys], device=rows.device)
        jacobian[index] = rows
        for params, grads in zip(own, own_grads):
            for param, grad in zip(params, grads):
                param.grad = grad if param.grad is None else param.grad + grad
        vector, present = balancer.stack(losses)
        labelled = self.present(batch, present).float()
        if self._window is None:
            self._window = {"jacobian": jacobian, "losses": vector.detach(), "labelled": labelled,
                            "micro": 1, "scale": scale, "penalty": regularized}  # fmt: skip
        else:
            self._window["jacobian"] += jacobian
            self._window["losses"] += vector.detach()
            self._window["labelled"] += labelled
            self._window["micro"] += 1
            if regularized is not None:
                previous = self._window["penalty"]
                self._window["penalty"] = regularized + (0 if previous is None else previous)

    def _aggregate(self, position: tuple) -> None:
        """End of a window: average over processes, aggregate, write `.grad`."""
        acc, window, self._window = self.accelerator, self._window, None
        model, shared = self._shared()
        jacobian, scale, penalty = window["jacobian"], window["scale"], window["penalty"]
        losses = window["losses"] / window["micro"]
        if acc.num_processes > 1:
            # Every rank must aggregate the same global Jacobian: a nonlinear aggregator of
            # per-rank Jacobians, averaged afterwards, is not the aggregator of the average.
            jacobian = acc.reduce(jacobian, reduction="mean")
            losses = acc.reduce(losses, reduction="mean")
            if penalty is not None:
                penalty = acc.reduce(penalty, reduction="mean")
            shared_ids = {id(p) for p in shared}
            heads = [
                p for p in model.parameters() if p.grad is not None and id(p) not in shared_ids
            ]
            flat = acc.reduce(torch.cat([p.grad.reshape(-1) for p in heads]), reduction="mean")
            offset = 0
            for param in heads:
                param.grad.copy_(flat[offset : offset + param.numel()].view_as(param))
                offset += param.numel()
        if not shared:
            return  # a linear probe: heads have their gradients, nothing is shared
        present = window["labelled"] > 0
        direction = self.balancer.scaled_direction(jacobian, losses, present, scale, *position)
        write_direction(direction if penalty is None else direction + penalty, shared)


Strategy = PlainSum | CombinedLoss | JacobianAggregation


def build_strategy(
    accelerator: Accelerator,
    model: torch.nn.Module,
    weights: dict[str, float],
    balancer: Balancer | None,
    *,
    tasks: dict[str, TaskSpec] | None = None,
    loss_options: dict[str, LossOptions] | None = None,
    channels_last: bool = False,
) -> Strategy:
    """The strategy for a run: plain sum without a balancer, else by the method's kind."""
    if balancer is None:
        return PlainSum(accelerator, weights, loss_options)
    if balancer.kind == "gradient":
        return JacobianAggregation(accelerator, weights, loss_options, balancer, model)
    return CombinedLoss(accelerator, weights, loss_options, balancer, model, tasks or {},
                        channels_last)  # fmt: skip
