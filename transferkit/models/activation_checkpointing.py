"""Gradient (activation) checkpointing of a backbone's layer groups: each group keeps only its
input during the forward pass and recomputes its activations when the backward pass reaches it.

timm models have their own switch (`set_grad_checkpointing`, non-reentrant
`torch.utils.checkpoint` around each block); other models get the same around the module of
each layer group. Both are non-reentrant, which is what makes them right under the freeze
schedule without any bookkeeping: a group whose input and parameters need no gradient (a frozen
group on the input side) builds no graph, so it keeps no activations and the backward pass never
recomputes it; once a phase unfreezes it, the next forward pass records it and its backward
recomputes it. Parameter names are unchanged (the freeze schedule finds its groups, and
checkpoints load either way).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_checkpointing(model: nn.Module, group_modules: list[str]) -> str:
    """Turn gradient checkpointing on for `model`; returns how, in words for the log."""
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return f"timm's set_grad_checkpointing on {type(model).__name__}"
    modules = dict(model.named_modules())
    wrapped = []
    for name in group_modules:
        module = modules.get(name)
        if module is None or module is model or getattr(module, "_checkpointed", False):
            continue
        if not any(True for _ in module.children()):  # one layer: nothing inside to drop
            continue
        module.forward = partial(_checkpointed, module, module.forward)
        module._checkpointed = True
        wrapped.append(name)
    return f"torch.utils.checkpoint around {len(wrapped)} layer groups ({', '.join(wrapped)})"


def _checkpointed(module: nn.Module, forward, *args, **kwargs):
    if torch.is_grad_enabled():  # as timm's: evaluation under no_grad keeps nothing anyway
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
