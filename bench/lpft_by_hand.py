"""LP-FT written by hand in plain PyTorch: the loop the benchmarks' hand-written rows share
(bench/quality.py on one task, bench/fit_handwritten.py on several), what a careful user
writes without transferkit."""

from __future__ import annotations

from collections.abc import Callable

import torch

BATCH = 16


def lpft_by_hand(
    model: torch.nn.Module,
    head: torch.nn.Module,
    features: torch.Tensor,
    images: torch.Tensor,
    loss_of: Callable[[object, torch.Tensor], torch.Tensor],
    epochs: int,
    order: torch.Generator,
    after_epoch: Callable[[], None] | None = None,
) -> None:
    """The first half of `epochs` trains `head` alone on the frozen backbone's `features` of the
    training images (AdamW lr 1e-3, weight decay 0.05); the second half trains every parameter
    on `images`, BatchNorm kept in eval mode (a fresh AdamW at lr 1e-4). Batches of 16 in an
    order drawn from `order`; `loss_of(outputs, rows)` is the loss of a batch of rows."""

    def one_epoch(inputs: torch.Tensor, optimizer: torch.optim.Optimizer, encode) -> None:
        for rows in torch.randperm(len(inputs), generator=order).split(BATCH):
            loss = loss_of(head(encode(inputs[rows])), rows)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    probe = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(epochs // 2):  # features once: the frozen backbone is deterministic
        one_epoch(features, probe, lambda f: f)
        if after_epoch is not None:
            after_epoch()
    params = [*model.parameters(), *head.parameters()]
    tune = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    for _ in range(epochs - epochs // 2):
        model.train()
        for module in model.modules():  # ImageNet statistics, not those of a few images
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        one_epoch(images, tune, model)
        if after_epoch is not None:
            after_epoch()
