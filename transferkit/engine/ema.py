"""An exponential moving average of the weights (`train.ema`), with timm's `ModelEmaV3`.

The average is built from the model before Accelerate prepares it (a copy made afterwards would
share Accelerate's mixed-precision forward wrapper with the trained model), updated after every
optimizer step with the step number (so its warmup is a function of the position, and a resumed
run replays it), checkpointed with `register_for_checkpointing`, and evaluated every epoch as
`val_ema/...` beside the raw model's `val/...`.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType
from timm.utils.model_ema import ModelEmaV3

from transferkit.errors import UserError

PREFIX = "val_ema"


def build_ema(section, model, accelerator: Accelerator) -> ModelEmaV3 | None:
    """The EMA that `train.ema` asks for (on the accelerator's device), or None."""
    if section is None:
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError(
            "train.ema does not run under FSDP (the average needs the full, unsharded weights "
            "on every process); remove train.ema or train with DDP"
        )
    ema = ModelEmaV3(
        model, decay=section.decay, use_warmup=section.warmup, warmup_power=section.warmup_power
    )
    return ema.to(accelerator.device)


def monitored(monitor: str, section) -> str:
    """The record key that picks the best epoch: the EMA's metric when it is the final model."""
    if section is not None and section.final_model:
        return f"{PREFIX}/{monitor.split('/', 1)[1]}"
    return monitor
