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

from transferkit.balancing.balancer import STATIC_WEIGHT_METHODS, Balancer, build_method
from transferkit.balancing.gradients import DBMTL, GradientAggregator, GradNorm, TorchJDAggregator
from transferkit.balancing.jacobian import cosine_similarities, objective_gradients, write_direction
from transferkit.balancing.losses import LossCombiner
from transferkit.balancing.methods import METHODS, Method

__all__ = [
    "METHODS",
    "STATIC_WEIGHT_METHODS",
    "Balancer",
    "DBMTL",
    "GradNorm",
    "GradientAggregator",
    "LossCombiner",
    "Method",
    "TorchJDAggregator",
    "build_method",
    "cosine_similarities",
    "objective_gradients",
    "write_direction",
]
