"""`Balancer`: a run's multi-task method over named objectives (see the package docstring), and
what the engine may ask of it; nothing outside this package touches the method itself."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from transferkit.balancing import state as foreign_state
from transferkit.balancing.gradients import GradientAggregator
from transferkit.balancing.jacobian import cosine_similarities
from transferkit.balancing.losses import LossCombiner, Reduce
from transferkit.balancing.methods import METHODS, Method, option_names
from transferkit.core import derive_seed, task_of
from transferkit.errors import UserError, did_you_mean

_RNG_STREAM = 0xBA1A  # keeps the balancing draws apart from dropout's
STATIC_WEIGHT_METHODS = ("sum", "mean")  # the others set their own weights


def build_method(name: str, num_objectives: int, options: dict | None = None):
    """The combiner or aggregator called `name`, with options checked; errors name the key."""
    if name not in METHODS:
        raise UserError(
            f"multitask.method: unknown method {name!r}.{did_you_mean(name, METHODS)} "
            f"Methods: {', '.join(METHODS)}"
        )
    method = METHODS[name]
    options = dict(options or {})
    allowed = option_names(method)
    for key in options:
        if key not in allowed:
            hint = f"its options: {', '.join(allowed)}" if allowed else "it takes no options"
            raise UserError(
                f"multitask.options.{key}: not an option of {name}{did_you_mean(key, allowed)}; "
                + hint
            )
    try:
        return method.build(num_objectives, options)
    except ImportError as err:
        raise UserError(
            f"multitask.method {name} needs an optional solver: {err}. "
            "Install transferkit with its dependencies (`make setup`, or pip install 'torchjd[full]')"
        ) from None
    except (TypeError, ValueError) as err:
        raise UserError(f"multitask.options for {name}: {err}") from None


class Balancer:
    """The method of a run, over named objectives; see the module docstring.

    `weights` maps a task name to its static weight (`tasks.NAME.weight`, default 1); an
    auxiliary-head objective `"task@group"` takes its task's weight, as in `multitask_loss`.
    With `sum` the combined loss is `sum_k w_k L_k`; with `mean` it is `sum_k w_k L_k / K`,
    K the number of objectives (absent ones are imputed, so K does not change from step to step).
    Other methods set their own weights and refuse any static weight other than 1.
    """

    def __init__(
        self,
        method: str,
        objectives: list[str],
        options: dict | None = None,
        seed: int = 0,
        *,
        weights: Mapping[str, float] | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        self.name = method
        self.objectives = list(objectives)
        self.impl = build_method(method, len(self.objectives), options)  # checks the name
        self.info: Method = METHODS[method]
        self.kind = self.info.kind
        if reduce is not None and isinstance(self.impl, LossCombiner):
            # Across processes: state built from loss values (DWA, FAMO) sees their mean.
            self.impl.reduce = reduce
        self.seed = seed
        self.last_weights: Tensor | None = None
        self.last_cosines: Tensor | None = None
        self.static_weights = self._static_weights(dict(weights or {}))
        if isinstance(self.impl, LossCombiner):
            self.impl.static_weights.copy_(self.static_weights)
        # Remembers the device: `impl.to(device)` (as the trainer calls it) moves it along, and
        # `load_state_dict` puts the loaded state there. Not persistent: not in checkpoints.
        self.impl.register_buffer("_balancer_device", torch.empty(0), persistent=False)

    # ---- what the engine must do for the method, as the registry declares it
    @property
    def learnable(self) -> bool:
        """Weights learned by the run's optimizer (UW, IMTL-L): `learnable_parameters`."""
        return self.info.learnable

    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.impl.parameters()) if self.info.learnable else []

    @property
    def needs_losses_after_step(self) -> bool:
        """The batch's losses are wanted again after the update (FAMO): `after_step`."""
        return self.info.losses_after_step

    @property
    def runs_under_fsdp(self) -> bool:
        """FSDP shards the weights: per-task gradients of them (gradient-based methods), loss
        weights outside the sharded model and a forward pass outside it would need them whole."""
        return self.kind == "loss" and not self.learnable and not self.needs_losses_after_step

    def after_step(self, losses: Tensor, present: Tensor) -> None:
        """The same batch's losses `[K]` after the optimizer step (`needs_losses_after_step`)."""
        self.impl.after_step(losses, present)

    def end_epoch(self) -> None:
        self.impl.end_epoch()

    @property
    def device(self) -> torch.device:
        """The device of the method's state (`to`)."""
        return self.impl._balancer_device.device

    def to(self, device: str | torch.device) -> Balancer:
        """Move the method's whole state to `device`: parameters and buffers, and the attributes
        that torchjd keeps outside them (DWA's averages, FAMO's and GradNorm's Adam moments,
        DB-MTL's average, ExcessMTL's sums). What the method keeps on the CPU by design stays
        there (GradVac's and PCD's averages, Nash-MTL's NumPy warm start, Adam step counters).
        """
        foreign_state.move_module(self.impl, torch.device(device))
        # The extra state is restored after the move, so internal optimizers are rebuilt over
        # the moved parameters; `self.device` has its index ("cuda" -> cuda:0), as tensors do.
        extra = foreign_state.to_device(self.impl.state_dict_extra(), self.device)
        self.impl.load_state_dict_extra(extra)
        return self

    def _static_weights(self, weights: dict[str, float]) -> Tensor:
        """`[K]` weights in objective order, each objective taking its task's weight."""
        tasks = {task_of(k) for k in self.objectives}
        for task, weight in weights.items():
            if task not in tasks:
                raise UserError(
                    f"tasks.{task}.weight: no objective of task {task!r} "
                    f"(objectives: {', '.join(self.objectives)})"
                )
            if not math.isfinite(weight) or weight < 0:
                raise UserError(f"tasks.{task}.weight: must be finite and >= 0, got {weight}")
            if weight != 1.0 and self.name not in STATIC_WEIGHT_METHODS:
                raise UserError(
                    f"tasks.{task}.weight: static weights apply with multitask.method sum or "
                    f"mean; {self.name} sets its own, so remove the weight"
                )
        return torch.tensor([float(weights.get(task_of(k), 1.0)) for k in self.objectives])

    # ---- shared helpers
    def stack(self, losses: dict[str, Tensor], device=None) -> tuple[Tensor, Tensor]:
        """`(losses [K], present [K])` in objective order; a missing output is absent."""
        some = next(iter(losses.values()))
        values = [losses.get(k, some.new_zeros(())) for k in self.objectives]
        present = torch.tensor([k in losses for k in self.objectives], device=some.device)
        return torch.stack([v.float() for v in values]), present

    def weights_dict(self) -> dict[str, float]:
        """The last step's weight per objective (absent ones left out)."""
        if self.last_weights is None:
            return {}
        return {
            k: float(w) for k, w in zip(self.objectives, self.last_weights) if torch.isfinite(w)
        }

    def cosines_dict(self) -> dict[str, float]:
        """The last step's gradient cosine per pair `"a|b"` (gradient-based methods only)."""
        if self.last_cosines is None:
            return {}
        out = {}
        for i, a in enumerate(self.objectives):
            for j in range(i + 1, len(self.objectives)):
                value = self.last_cosines[i, j]
                if torch.isfinite(value):
                    out[f"{a}|{self.objectives[j]}"] = float(value)
        return out

    # ---- loss-based
    def combine(self, losses: Tensor, present: Tensor, *position: int) -> Tensor:
        """The scalar to backpropagate (`losses` as from `stack`); records each task's effective
        weight d(combined)/d(loss_k), read off the small graph between them."""
        assert isinstance(self.impl, LossCombiner)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, _RNG_STREAM, *position))
            combined = self.impl(losses, present)
        if losses.requires_grad:
            (grad,) = torch.autograd.grad(combined, losses, retain_graph=True, allow_unused=True)
            weights = torch.zeros_like(losses) if grad is None else grad.detach()
            self.last_weights = torch.where(present, weights, float("nan")).cpu()
        return combined

    # ---- gradient-based
    def aggregate(
        self, jacobian: Tensor, losses: Tensor, present: Tensor, *position: int
    ) -> Tensor:
        """The update direction of the shared parameters; records weights and cosines."""
        assert isinstance(self.impl, GradientAggregator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, _RNG_STREAM, *position))
            direction = self.impl(jacobian, losses, present)
        self.last_weights = self.impl.last_weights
        cos = torch.full((len(self.objectives),) * 2, float("nan"))
        rows = present.nonzero().squeeze(1).cpu()
        if jacobian.shape[1]:
            sub = cosine_similarities(jacobian[present].float()).cpu()
            cos[rows[:, None], rows[None, :]] = sub
        self.last_cosines = cos
        return direction

    def scaled_direction(
        self, jacobian: Tensor, losses: Tensor, present: Tensor, scale: float, *position: int
    ) -> Tensor:
        """The direction for a Jacobian of fp16-scaled losses, scaled back the same way.

        The method sees the true (unscaled) Jacobian, since most are not scale-invariant
        (Nash-MTL, GradNorm, DB-MTL). On overflow the non-finite sum is returned, so the
        gradient scaler skips the step and lowers the scale as with plain losses, and the
        method's state is left untouched.
        """
        unscaled = jacobian / scale
        if not bool(torch.isfinite(unscaled).all()):
            return jacobian.sum(dim=0)
        return self.aggregate(unscaled, losses, present, *position) * scale

    # ---- checkpointing (Accelerate's register_for_checkpointing)
    def state_dict(self) -> dict:
        """The method's state: its module state and the attributes torchjd keeps outside it."""
        return {"module": self.impl.state_dict(), "extra": self.impl.state_dict_extra()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, into a freshly built method, on the device the
        balancer is on (Accelerate loads registered objects' state on the CPU)."""
        device = self.device
        module_state = state["module"]
        expected = self.impl.state_dict()
        for key, value in module_state.items():
            if key not in expected:
                # torchjd registers some state buffers at their first call: register them now.
                path, _, name = key.rpartition(".")
                self.impl.get_submodule(path).register_buffer(name, value.clone())
        self.impl.load_state_dict(module_state)
        foreign_state.move_module(self.impl, device)  # the buffers just registered
        self.impl.load_state_dict_extra(foreign_state.to_device(state["extra"], device))
