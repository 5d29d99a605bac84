"""Mixup and CutMix across tasks (`train.mixup`), on top of timm's `Mixup` in batch mode.

timm mixes each image with the batch's reversed order (row i with row B-1-i) and returns the
mixing weight `lam`; every task's targets are mixed the same way here: multiclass indices become
soft labels, binary and multilabel targets mixed fractions, regression targets mixed values or
masked (`train.mixup.regression`). A mixed row keeps a task's label only when both of its rows
have one; otherwise it is masked for that task.

timm draws `lam` and the CutMix box from NumPy's global generator: it is seeded here from the
seed and the position of the micro-batch among all processes' micro-batches, and restored
afterwards. One process with `grad_accum: 2` and two processes then mix the same rows alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup

from transferkit.core import derive_seed
from transferkit.models import TaskSpec

_STREAM = 0x313C  # keeps the mixing draws apart from other seeded streams


class TaskMixer:
    """Mixes a training batch's images and the targets of every task."""

    def __init__(self, section, tasks: dict[str, TaskSpec], seed: int, process: int,
                 processes: int) -> None:  # fmt: skip
        self.mixup = Mixup(
            mixup_alpha=section.mixup_alpha,
            cutmix_alpha=section.cutmix_alpha,
            prob=section.prob,
            switch_prob=section.switch_prob,
            mode="batch",
            label_smoothing=0.0,  # per task, in the loss (tasks.NAME.label_smoothing)
        )
        self.exclude_regression = section.regression == "exclude"
        self.tasks, self.seed = tasks, seed
        self.process, self.processes = process, processes

    def __call__(self, batch: dict, epoch: int, batches: int) -> dict:
        """`batch` mixed (a new dict; the loader's tensors are not changed in place)."""
        images = batch["image"].clone()
        slot = (batches - 1) * self.processes + self.process  # this micro-batch among all
        saved = np.random.get_state()
        np.random.seed(derive_seed(self.seed, epoch, slot, _STREAM) % 2**32)
        try:
            lam = float(self.mixup._mix_batch(images))
        finally:
            np.random.set_state(saved)
        if lam == 1.0:
            return batch
        targets, masks = {}, {}
        for name, task in self.tasks.items():
            target, mask = batch["targets"][name], batch["mask"][name]
            if task.kind == "regression" and self.exclude_regression:
                targets[name], masks[name] = target, torch.zeros_like(mask)
                continue
            if task.kind == "multiclass":
                target = F.one_hot(target.long(), task.num_outputs)  # placeholders: class 0
            target = target.float()
            targets[name] = lam * target + (1.0 - lam) * target.flip(0)
            masks[name] = mask & mask.flip(0)
        return {**batch, "image": images, "targets": targets, "mask": masks}


def build_mixer(section, tasks: dict[str, TaskSpec], seed: int, accelerator) -> TaskMixer | None:
    """The mixer `train.mixup` asks for, or None (off by default)."""
    if section is None:
        return None
    return TaskMixer(section, tasks, seed, accelerator.process_index, accelerator.num_processes)
