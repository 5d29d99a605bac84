"""Loading weight files safely, with a short report instead of a strict-load traceback.

Files are read through safetensors or `torch.load(weights_only=True)` only, so a file received
from someone else cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from transferkit.errors import UserError
from transferkit.models.backbone import DataConfig, LoadReport

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Checkpoints often nest the weights under one of these keys.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema", "params")
# Wrappers (DDP, Lightning modules, EMA) prefix every key with one of these.
_RUN_BACKBONE = "backbone.model."  # keys of a MultiTaskModel saved in a run folder
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.", "encoder.")


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file into (state dict, metadata). Metadata is empty except for safetensors."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"  # a transferkit run folder
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(
            f"unsupported weights file {path.name}: use one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                obj = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        else:
            metadata = {}
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable file
        raise UserError(
            f"cannot read weights file {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]} "
            "(files are loaded with weights_only=True: pickled code is refused)"
        ) from None
    return _unnest(obj, path), metadata


def _unnest(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, dict):
            nested = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), dict)), None)
            if nested is not None:
                obj = nested
                continue
        break
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        if not obj:
            raise UserError(f"weights file {path} holds no tensors")
    raise UserError(f"{path} holds no state dict of tensors (found {type(obj).__name__})")


def _strip_wrapper_prefixes(
    state: dict[str, torch.Tensor], model_keys: set[str]
) -> dict[str, torch.Tensor]:
    # With no keys every prefix is "shared by all keys" and stripping it changes nothing, so
    # the loop would never end: an empty state has nothing to strip.
    changed = bool(state)
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(
                k.startswith(prefix) for k in model_keys
            ):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    architecture: str,
    classifier_prefixes: tuple[str, ...] = (),
) -> LoadReport:
    """Load `state` into `model` non-strictly, or raise a `UserError` if it is another architecture.

    Keys of the source model's classifier are dropped (a new head replaces it). The file is
    taken for another architecture when tensors have other shapes, when more than a tenth of the
    model's tensors are missing from the file, or when more than a tenth of the file is unused.
    """
    model_state = model.state_dict()
    if any(k.startswith(_RUN_BACKBONE) for k in state):
        # A transferkit run's model: keep its backbone, drop its task heads like a classifier.
        heads = sorted(k for k in state if not k.startswith(_RUN_BACKBONE))
        state = {
            k[len(_RUN_BACKBONE) :]: v for k, v in state.items() if k.startswith(_RUN_BACKBONE)
        }
    else:
        heads = []
    state = _strip_wrapper_prefixes(state, set(model_state))
    dropped = sorted(
        k
        for k in state
        if any(k == p or k.startswith(p + ".") for p in classifier_prefixes)
        and k not in model_state
    )
    state = {k: v for k, v in state.items() if k not in set(dropped)}
    shape_mismatch = [
        k for k, v in state.items() if k in model_state and model_state[k].shape != v.shape
    ]
    matched = [k for k in state if k in model_state and k not in shape_mismatch]
    missing = sorted(k for k in model_state if k not in state)
    unexpected = sorted(k for k in state if k not in model_state)
    model_size = max(len(model_state), 1)
    # Old checkpoints lack BatchNorm's num_batches_tracked; that alone is no mismatch.
    missing_weights = [k for k in missing if not k.endswith("num_batches_tracked")]
    if (
        shape_mismatch
        or len(missing_weights) > 0.1 * model_size
        or len(unexpected) > 0.1 * max(len(state), 1)
    ):
        detail = []
        if shape_mismatch:
            k = shape_mismatch[0]
            detail.append(
                f"{len(shape_mismatch)} tensors have other shapes (e.g. {k}: file "
                f"{tuple(state[k].shape)} vs model {tuple(model_state[k].shape)})"
            )
        detail.append(f"{len(matched)} of the model's {len(model_state)} tensors found")
        if unexpected:
            detail.append(f"{len(unexpected)} unknown keys (e.g. {', '.join(unexpected[:3])})")
        raise UserError(
            f"weights file {source} does not fit {architecture}: {'; '.join(detail)}. "
            "Is it for another architecture? Pass the backbone name the file was trained with."
        )
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    return LoadReport(
        source=str(source),
        loaded=len(matched),
        missing=missing,
        unexpected=unexpected,
        dropped_classifier=heads + dropped,
    )


def data_config_from_metadata(metadata: dict[str, str]) -> DataConfig | None:
    """The preprocessing stored by `Backbone.save`, if the file has it."""
    raw = metadata.get("transferkit.data_config")
    return DataConfig.from_dict(json.loads(raw)) if raw else None
