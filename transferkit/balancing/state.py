"""Checkpointable state of methods we do not own (torchjd's), as plain tensors and numbers.

torchjd keeps the state of its stateful methods in ordinary attributes (a step counter, an EMA
tensor, NumPy arrays, an internal Adam), not in `state_dict()`. `capture` walks a module tree and
records those attributes, so Accelerate can save them and `weights_only` loading can read them;
solver objects (cvxpy problems) are skipped and rebuilt by the method on its next call.

`to_device` and `move_module` place that state on a run's device (see `Balancer.to`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torchjd import aggregation

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


# torchjd computes these weightings on the CPU and keeps their state there, whatever the device
# of the Jacobian (GradVac's cosine averages, PCD's squared-norm averages): a run that never
# stopped has them on the CPU, and GradVac would mix devices if they were on a GPU.
HOST_STATE: dict[type, tuple[str, ...]] = {
    aggregation.GradVacWeighting: ("_phi_t",),
    aggregation.PCDWeighting: ("_sq_norm_ema", "_n_steps"),
}


def to_device(state: Any, device: torch.device) -> Any:
    """`state` as `capture` (or a `state_dict_extra`) returns it, with its tensors on `device`.

    NumPy arrays stay host arrays. A recorded device becomes `device` (ExcessMTL keys its state
    by the Jacobian's device, and would otherwise start again). An optimizer's state is left as
    it is: loading it into an optimizer places it by the optimizer's parameters, under torch's
    own rules (moments with their parameter; step counters on the CPU unless the optimizer is
    capturable or fused).
    """
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        if "__device__" in state:
            return {"__device__": str(device)}
        if "__numpy__" in state or "__optimizer__" in state:
            return state
        if {"state", "param_groups"} <= state.keys():  # an optimizer's own state_dict
            return state
        return {key: to_device(value, device) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_device(value, device) for value in state)
    return state


def _host_state(module: nn.Module) -> dict[tuple[nn.Module, str], torch.Tensor]:
    """The state that the method keeps on the CPU (`HOST_STATE`), on the CPU, by place."""
    found = {}
    for sub in module.modules():
        for name in HOST_STATE.get(type(sub), ()):
            value = getattr(sub, name, None)
            if isinstance(value, torch.Tensor):
                found[(sub, name)] = value.cpu()
    return found


def move_module(module: nn.Module, device: torch.device) -> None:
    """`module.to(device)`, except for the state that the method keeps on the CPU."""
    host = _host_state(module)
    module.to(device)
    for (sub, name), value in host.items():
        setattr(sub, name, value)
