"""Test-only launcher: `transferkit ARGS` with Accelerate's FSDP switched on for CPU processes.

Accelerate 1.15 turns `ACCELERATE_USE_FSDP=true` into FSDP only on GPUs and other accelerators:
on a CPU (`DistributedType.MULTI_CPU`, gloo) it keeps DDP (and transferkit refuses to run, see
`transferkit.engine.accelerator.check_fsdp`). PyTorch's FSDP itself runs on CPU with gloo, so this
launcher sets the state Accelerate would set on GPUs, and the CPU suite can run transferkit's
FSDP paths (sharded training across a phase change, `save_state`/`load_state`, the gathered
model file) under torchrun:

    torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py train RECIPE --output DIR
"""

from __future__ import annotations

import sys

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs) -> None:
    _accelerator_state_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # What AcceleratorState does for a GPU process with the plugin (accelerate/state.py).
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        # FSDP compares its `device_id` with the parameters' device: "cpu:0" is not "cpu".
        self.device = torch.device("cpu")
        # Each later `AcceleratorState()` copies PartialState's fields back over its own.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        PartialState._shared_state["device"] = self.device


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from transferkit.cli import main

    sys.exit(main(sys.argv[1:]))
