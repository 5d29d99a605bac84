"""Checkpointable state of methods we do not own (torchjd's), as plain tensors and numbers.

torchjd keeps the state of its stateful methods in ordinary attributes (a step counter, an EMA
tensor, NumPy arrays, an internal Adam), not in `state_dict()`. `capture` walks a module tree and
records those attributes, so Accelerate can save them and `weights_only` loading can read them;
solver objects (cvxpy problems) are skipped and rebuilt by the method on its next call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

_SKIP = {"training", "_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"}


def _encode(value: Any) -> tuple[bool, Any]:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True, value
    if isinstance(value, torch.Tensor):
        return True, value.detach().clone()
    if isinstance(value, np.ndarray):
        return True, {"__numpy__": torch.from_numpy(np.array(value))}
    if isinstance(value, torch.optim.Optimizer):
        return True, {"__optimizer__": value.state_dict()}
    if isinstance(value, (list, tuple)):
        encoded = [_encode(v) for v in value]
        if all(ok for ok, _ in encoded):
            kind = "__tuple__" if isinstance(value, tuple) else "__list__"
            return True, {kind: [v for _, v in encoded]}
    if isinstance(value, torch.dtype):
        return True, {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return True, {"__device__": str(value)}
    return False, None


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__numpy__" in value:
            return value["__numpy__"].numpy()
        if "__list__" in value:
            return [_decode(v) for v in value["__list__"]]
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
        if "__device__" in value:
            return torch.device(value["__device__"])
    return value


def capture(module: nn.Module) -> dict[str, Any]:
    """`{"sub.module.attr": value}` for every plain attribute of `module` and its children."""
    state: dict[str, Any] = {}
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if name in _SKIP or name.startswith("_forward") or name.startswith("_backward"):
                continue
            if "hook" in name:
                continue
            ok, encoded = _encode(value)
            if ok:
                state[f"{prefix}.{name}" if prefix else name] = encoded
    return state


def restore(module: nn.Module, state: dict[str, Any], rebuild_optimizer=None) -> None:
    """Set back what `capture` recorded; an optimizer is rebuilt by `rebuild_optimizer(sub)`."""
    for key, value in state.items():
        path, _, name = key.rpartition(".")
        sub = module.get_submodule(path) if path else module
        if isinstance(value, dict) and "__optimizer__" in value:
            optimizer = rebuild_optimizer(sub)
            optimizer.load_state_dict(value["__optimizer__"])
            object.__setattr__(sub, name, optimizer)
            continue
        object.__setattr__(sub, name, _decode(value))
