"""Multi-task balancing: how the losses of several tasks become one update.

Two small interfaces, composed rather than inherited:
- `LossCombiner(losses, present) -> scalar`: loss-based methods, one backward pass;
- `GradientAggregator(jacobian, losses, present) -> direction`: gradient-based methods, over
  the per-task gradients of the trainable shared parameters.

`Balancer` wraps either one for the trainer: it names the objectives (task heads and auxiliary
heads, `dict[str, Tensor]` in), applies the static weights of `sum` and `mean`, keeps the
per-task weights of the last step for logging, draws randomness identically on every process,
and is checkpointed with the run through `state_dict`/`load_state_dict` (tensors and numbers
only, so `weights_only` loading reads it). `to(device)` moves its whole state, and loading
keeps the state on the device the balancer is on (Accelerate loads it on the CPU).
"""

from transferkit.core import lazy_exports

# Each name is imported on first use: torchjd (which imports cvxpy and qpsolvers) takes a second
# to import, and a run with the plain sum never needs it.
_WHERE = {
    "METHODS": "transferkit.balancing.methods",
    "Method": "transferkit.balancing.methods",
    "STATIC_WEIGHT_METHODS": "transferkit.balancing.balancer",
    "Balancer": "transferkit.balancing.balancer",
    "build_method": "transferkit.balancing.balancer",
    "DBMTL": "transferkit.balancing.gradients",
    "GradNorm": "transferkit.balancing.gradients",
    "GradientAggregator": "transferkit.balancing.gradients",
    "TorchJDAggregator": "transferkit.balancing.gradients",
    "LossCombiner": "transferkit.balancing.losses",
    "cosine_similarities": "transferkit.balancing.jacobian",
    "objective_gradients": "transferkit.balancing.jacobian",
    "write_direction": "transferkit.balancing.jacobian",
}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
