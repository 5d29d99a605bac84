"""Gradient-based methods: a `GradientAggregator` turns the per-task gradients of the shared
parameters (a `[K, n]` Jacobian) into one update direction `[n]`.

torchjd's aggregators are used through one adapter; GradNorm and DB-MTL, which torchjd lacks,
are written here against the same interface. Every aggregator also sees the task losses (GradNorm
and DB-MTL need them) and a `present` mask: a task with no label in the whole global batch has
no gradient this step, and its row is left out.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torchjd import aggregation

from transferkit.balancing import state as foreign_state


class GradientAggregator(nn.Module, ABC):
    """`aggregator(jacobian, losses, present) -> direction`; `last_weights` holds the per-task
    weights of the last call when the method has them (NaN for absent tasks), else None."""

    def __init__(self) -> None:
        super().__init__()
        self.last_weights: Tensor | None = None

    @abstractmethod
    def forward(self, jacobian: Tensor, losses: Tensor, present: Tensor) -> Tensor:
        """The update direction `[n]` from the Jacobian `[K, n]`, losses `[K]`, present `[K]`."""

    def end_epoch(self) -> None:
        """Called once at the end of every epoch."""

    def state_dict_extra(self) -> dict:
        return {}

    def load_state_dict_extra(self, state: dict) -> None:
        """Restore what `state_dict_extra` returned."""


def _scatter(weights: Tensor, present: Tensor) -> Tensor:
    """`weights` of the present tasks in a `[K]` vector, NaN for absent ones, on the weights'
    device (the CPU, for logging). The mask may be on a GPU: indexing a CPU tensor with a CUDA
    mask is an error, so it is moved first."""
    full = torch.full(present.shape, float("nan"), dtype=weights.dtype, device=weights.device)
    full[present.to(weights.device)] = weights
    return full


class TorchJDAggregator(GradientAggregator):
    """Adapter over a `torchjd.aggregation.Aggregator`.

    Weights are read from the aggregator's own weighting through a forward hook, so logging
    them costs nothing and never advances a stateful method twice. torchjd's stateful
    aggregators (NashMTL, GradVac, PCD, ExcessMTL) keep state shaped by the number of tasks: on
    a step where a task is absent they would reset it, so that step falls back to the mean of the
    present gradients and leaves their state alone (counted in `fallback_steps`).
    """

    def __init__(self, aggregator: aggregation.Aggregator, stateful: bool = False) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.stateful = stateful
        self.fallback_steps = 0
        self._captured: Tensor | None = None
        weighting = getattr(aggregator, "weighting", None)
        if isinstance(weighting, nn.Module):
            weighting.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output) -> None:
        self._captured = output.detach()

    def forward(self, jacobian: Tensor, losses: Tensor, present: Tensor) -> Tensor:
        self._captured = None
        rows = jacobian[present]
        if self.stateful and not bool(present.all()):
            self.fallback_steps += 1
            direction = rows.mean(dim=0)
            self.last_weights = _scatter(torch.full((rows.shape[0],), 1 / rows.shape[0]), present)
            return direction
        with warnings.catch_warnings():
            # cvxpy's note that Nash-MTL's problem is not DPP (a speed hint for cvxpy users).
            warnings.filterwarnings("ignore", message=".*not DPP.*")
            direction = self.aggregator(rows)
        captured = self._captured
        self.last_weights = None if captured is None else _scatter(captured.cpu(), present)
        return direction

    def state_dict_extra(self) -> dict:
        return {"fallback_steps": self.fallback_steps, **foreign_state.capture(self.aggregator)}

    def load_state_dict_extra(self, state: dict) -> None:
        state = dict(state)
        self.fallback_steps = int(state.pop("fallback_steps", 0))
        foreign_state.restore(self.aggregator, state)
        for module in self.aggregator.modules():
            # Nash-MTL builds its cvxpy problem at its first step; a restored one past it
            # rebuilds it from the restored weights.
            if hasattr(module, "_init_optim_problem") and getattr(module, "step", 0) > 0:
                module._init_optim_problem()


class GradNorm(GradientAggregator):
    """GradNorm (Chen et al., ICML 2018): learn loss weights so that each task's weighted
    gradient norm tracks the mean norm times its relative inverse training rate.

    With `G_i = ||w_i J_i||`, `Ḡ = mean(G)`, `r_i = (L_i / L_i(0)) / mean(L / L(0))`, the weights
    minimise `sum_i |G_i - Ḡ r_i^alpha|` (the target treated as a constant) by one Adam step per
    update on logits `s`, with `w = K softmax(s)` (so the weights always sum to K, the paper's
    renormalisation). The direction uses the weights before their update: `d = sum_i w_i J_i`.
    `L(0)` are the first losses seen for each task. Gradients are taken over every trainable
    shared parameter, not only the last shared layer (as LibMTL does).
    """

    def __init__(self, num_objectives: int, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        if alpha < 0 or lr <= 0:
            raise ValueError("GradNorm needs alpha >= 0 and lr > 0")
        self.alpha, self.lr = alpha, lr
        self.logits = nn.Parameter(torch.zeros(num_objectives), requires_grad=False)
        self.register_buffer("initial_losses", torch.full((num_objectives,), float("nan")))
        self._optimizer = torch.optim.Adam([self.logits], lr=lr)

    def weights(self) -> Tensor:
        return self.logits.numel() * torch.softmax(self.logits.detach(), dim=0)

    def forward(self, jacobian: Tensor, losses: Tensor, present: Tensor) -> Tensor:
        losses = losses.detach().float()
        fresh = present & torch.isnan(self.initial_losses)
        self.initial_losses[fresh] = losses[fresh].to(self.initial_losses)
        weights = self.weights().to(jacobian)
        rows, index = jacobian[present], present.nonzero().squeeze(1)
        direction = weights[index] @ rows
        self.last_weights = _scatter(weights[index].cpu(), present.cpu())

        norms = rows.norm(dim=1)  # ||J_i||; G_i = w_i ||J_i|| since w_i > 0
        with torch.enable_grad():
            logits = self.logits.clone().requires_grad_(True)
            w = logits.numel() * torch.softmax(logits, dim=0)
            grad_norms = w[index] * norms.to(w)
            ratios = losses[index] / self.initial_losses[index].to(losses)
            inverse_rate = ratios / ratios.mean()
            target = (grad_norms.mean() * inverse_rate**self.alpha).detach()
            objective = (grad_norms - target).abs().sum()
            (grad,) = torch.autograd.grad(objective, logits)
        self.logits.grad = grad
        self._optimizer.step()
        self.logits.grad = None
        return direction

    def state_dict_extra(self) -> dict:
        return {"optimizer": self._optimizer.state_dict()}

    def load_state_dict_extra(self, state: dict) -> None:
        # A new Adam over the current `logits`: after a move to a device whose tensors cannot
        # share storage with the old ones (meta), `logits` is a new Parameter.
        self._optimizer = torch.optim.Adam([self.logits], lr=self.lr)
        self._optimizer.load_state_dict(state["optimizer"])


class DBMTL(GradientAggregator):
    """DB-MTL (Lin et al., 2023): dual balancing.

    Loss scale: each task's gradient is that of `log(L_i + eps)`, i.e. `J_i / (L_i + eps)`.
    Gradient magnitude: an EMA `g_i <- J_i + (beta / t^beta_sigma) (g_i - J_i)` of those log-loss
    gradients (`t` counts each task's updates), then `d = sum_i (max_j ||g_j|| / ||g_i||) g_i`,
    so every task contributes a gradient as large as the largest one. `last_weights` are the
    magnitude factors `alpha_i`. Defaults are LibMTL's (beta 0.9, beta_sigma 0: a constant EMA).
    """

    def __init__(
        self, num_objectives: int, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.beta, self.beta_sigma, self.eps = beta, beta_sigma, eps
        self.register_buffer("steps", torch.zeros(num_objectives, dtype=torch.long))
        self.buffer: Tensor | None = (
            None  # [K, n], created at the first call (n changes on unfreeze)
        )

    def forward(self, jacobian: Tensor, losses: Tensor, present: Tensor) -> Tensor:
        if self.buffer is None or self.buffer.shape != jacobian.shape:
            # A phase change alters the shared parameters: start the averages again.
            self.buffer = torch.zeros_like(jacobian)
            self.steps.zero_()
        log_grads = jacobian / (losses.detach().to(jacobian) + self.eps).unsqueeze(1)
        index = present.nonzero().squeeze(1)
        self.steps[index] += 1
        decay = (self.beta / self.steps[index].to(jacobian) ** self.beta_sigma).unsqueeze(1)
        rows = log_grads[index]
        self.buffer[index] = rows + decay * (self.buffer[index] - rows)
        averaged = self.buffer[index]
        norms = averaged.norm(dim=1)
        alpha = norms.max() / (norms + self.eps)
        self.last_weights = _scatter(alpha.cpu(), present.cpu())
        return alpha @ averaged

    def state_dict_extra(self) -> dict:
        return {"buffer": None if self.buffer is None else self.buffer.clone()}

    def load_state_dict_extra(self, state: dict) -> None:
        self.buffer = state["buffer"]
