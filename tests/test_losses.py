"""Multi-task losses: missing labels are masked out, static weights apply, aux heads count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transferkit.engine.losses import multitask_loss, task_loss
from transferkit.models import TaskSpec

DIGIT = TaskSpec("digit", "multiclass", 3)
EVEN = TaskSpec("even", "binary")
SIZE = TaskSpec("size", "regression")


def test_masked_rows_do_not_count():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    target = torch.tensor([0, 0, 2])  # row 1 is wrong but unlabelled
    mask = torch.tensor([True, False, True])
    expected = F.cross_entropy(logits[[0, 2]], target[[0, 2]])
    assert task_loss(DIGIT, logits, target, mask) == pytest.approx(expected.item())


def test_no_label_in_the_batch_gives_zero_with_a_graph():
    out = torch.randn(4, requires_grad=True)
    loss = task_loss(SIZE, out, torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(out.grad, torch.zeros(4))


def test_static_weights_and_aux_heads():
    outputs = {
        "even": torch.tensor([0.3, -1.0]),
        "size": torch.tensor([1.0, 2.0]),
        "size@layer2": torch.tensor([0.0, 0.0]),
    }
    targets = {"even": torch.tensor([1.0, 0.0]), "size": torch.tensor([1.5, 2.0])}
    masks = {"even": torch.tensor([True, True]), "size": torch.tensor([True, True])}
    total, losses = multitask_loss(
        outputs, targets, masks, {"even": EVEN, "size": SIZE}, {"even": 2.0, "size": 0.5}
    )
    assert set(losses) == {"even", "size", "size@layer2"}
    bce = F.binary_cross_entropy_with_logits(outputs["even"], targets["even"])
    assert losses["size"].item() == pytest.approx(0.125) and losses[
        "size@layer2"
    ].item() == pytest.approx(3.125)
    assert total.item() == pytest.approx(2.0 * bce.item() + 0.5 * (0.125 + 3.125))
