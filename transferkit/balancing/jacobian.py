"""Per-task gradients of the shared parameters, for the gradient-based methods.

Each objective's loss is differentiated on its own, end to end, with respect to the trainable
shared parameters and its own head. That is what makes auxiliary heads on intermediate groups
(deep supervision) correct: their loss reaches only the layers below their group, and they get
zero gradient above it. The shortcut of differentiating every loss through the last shared
features (torchjd's `mtl_backward(features=...)`) cannot express that: the auxiliary loss never
passes through those features, so the layers below would be taken for task-specific ones.

Frozen parameters are not inputs, so autograd stops at the frozen prefix: the cost of the
Jacobian is K backward passes through the trainable part only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def objective_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[nn.Parameter],
    own: Sequence[Sequence[nn.Parameter]],
    scale: float = 1.0,
) -> tuple[Tensor, list[list[Tensor]]]:
    """`(jacobian [K, n_shared], [grads of each objective's own parameters])` for `scale * loss`.

    A parameter an objective does not reach gets a zero gradient.
    """
    rows, own_grads = [], []
    for k, loss in enumerate(losses):
        inputs = [*shared, *own[k]]
        grads = torch.autograd.grad(
            loss * scale, inputs, retain_graph=k < len(losses) - 1, allow_unused=True
        )
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)]
        shared_grads = grads[: len(shared)]
        rows.append(torch.cat([g.reshape(-1).float() for g in shared_grads]) if shared else
                    loss.new_zeros(0, dtype=torch.float32))  # fmt: skip
        own_grads.append(grads[len(shared) :])
    return torch.stack(rows), own_grads


def write_direction(direction: Tensor, shared: Sequence[nn.Parameter]) -> None:
    """Set the shared parameters' `.grad` from a flat `[n_shared]` update direction."""
    offset = 0
    for param in shared:
        count = param.numel()
        param.grad = direction[offset : offset + count].view_as(param).to(param.dtype).clone()
        offset += count


def cosine_similarities(jacobian: Tensor) -> Tensor:
    """`[K, K]` cosine similarities between the rows (0 where a row is zero)."""
    gram = jacobian @ jacobian.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    return gram / (norms[:, None] * norms[None, :]).clamp_min(1e-12)
