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


def _case(kind: str, soft: bool):
    n = {"multiclass": 4, "binary": 1, "multilabel": 3, "regression": 2}[kind]
    output = torch.randn(9) if kind == "binary" else torch.randn(9, n)
    if kind == "multiclass":
        target = torch.softmax(torch.randn(9, n), -1) if soft else torch.randint(0, n, (9,))
    elif kind == "regression":
        target = torch.randn(9, n)
    else:
        target = torch.randint(0, 2, output.shape).float()
    return TaskSpec("t", kind, n), output, target


_OPTION_CASES = [
    (kind, soft, weighted, focal, smoothing)
    for kind, soft in [("multiclass", False), ("multiclass", True), ("binary", False),
                       ("multilabel", False), ("regression", False)]
    for weighted in (False, True)
    for focal in (None, 2.0)
    for smoothing in (0.0, 0.1)
    # regression has no class weights, smoothing or focal loss; focal is for sigmoid outputs
    if (kind != "regression" or not (weighted or focal or smoothing))
    and (kind in ("binary", "multilabel") or focal is None)
]  # fmt: skip


@pytest.mark.parametrize("kind,soft,weighted,focal,smoothing", _OPTION_CASES)
def test_a_masked_loss_is_the_loss_of_the_labelled_rows_alone(
    kind, soft, weighted, focal, smoothing
):
    """The loss is computed over the whole batch and masked (no host read, see
    test_host_reads.py); it must equal the loss of the labelled rows taken out, and its gradient
    must not reach the unlabelled rows."""
    from transferkit.engine.losses import LossOptions

    task, output, target = _case(kind, soft)
    weights = torch.rand(2 if kind == "binary" else task.num_outputs) + 0.5 if weighted else None
    options = LossOptions(label_smoothing=smoothing, class_weights=weights, focal_gamma=focal)
    mask = torch.tensor([True, False, True, True, False, False, True, False, True])
    output.requires_grad_()
    masked = task_loss(task, output, target, mask, options)
    masked.backward()
    alone = task_loss(task, output[mask], target[mask], torch.ones(5, dtype=torch.bool), options)
    torch.testing.assert_close(masked, alone)
    assert torch.all(output.grad[~mask] == 0) and output.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("kind,soft", [("multiclass", False), ("multiclass", True), ("binary", False),
                                       ("multilabel", False), ("regression", False)])  # fmt: skip
def test_a_non_finite_output_in_an_unlabelled_row_sends_no_nan_back(kind, soft):
    """Indexing the labelled rows out gave the others an exact zero gradient; masking must too,
    or a NaN output where there is no label would reach the weights unseen."""
    task, output, target = _case(kind, soft)
    mask = torch.ones(9, dtype=torch.bool)
    mask[4] = False
    output[4] = float("nan")
    output.requires_grad_()
    loss = task_loss(task, output, target, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(output.grad).all()
    assert torch.all(output.grad[4] == 0)
