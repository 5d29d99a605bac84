"""Regression tests for defects found in review: a one-label multilabel task, static weights
with `multitask.method: mean`, and a feature cache on disk that must not hold every feature in
memory while it is built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchmetrics as tm

from transferkit.balancing import Balancer
from transferkit.data.dataset import _targets
from transferkit.data.labels import encode_task
from transferkit.engine.losses import multitask_loss
from transferkit.engine.metrics import compute, prediction, task_metrics, update
from transferkit.engine.run import describe_prediction
from transferkit.errors import UserError
from transferkit.models import MultiTaskModel, TaskSpec, create_backbone

# ---------------------------------------------------------------------------------------------
# Static weights (`tasks.NAME.weight`) with `multitask.method: mean`

OBJECTIVES = ["even", "size", "size@layer2"]  # an auxiliary head takes its task's weight
WEIGHTS = {"even": 2.0, "size": 0.5}


def _combine(balancer: Balancer, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    return balancer.combine(losses.clone().requires_grad_(True) * 1.0, present, 0, 0)


def test_mean_applies_static_weights_as_the_weighted_sum_over_k():
    """`mean` is `sum` divided by the number of objectives K, static weights included; it used
    to drop them, so a recipe's `tasks.NAME.weight` had no effect with `mean`."""
    losses = torch.tensor([0.7, 1.3, 2.9])
    present = torch.ones(3, dtype=torch.bool)
    mean = Balancer("mean", OBJECTIVES, weights=WEIGHTS)
    combined = _combine(mean, losses, present)
    per_objective = torch.tensor([2.0, 0.5, 0.5])
    assert combined.item() == pytest.approx(float((per_objective * losses).sum() / 3))
    assert torch.allclose(mean.last_weights, per_objective / 3)  # what mtl/weight/* logs

    # The same weighted sum the trainer's plain `sum` path computes, divided by K.
    outputs = {"even": torch.tensor([0.3, -1.0]), "size": torch.tensor([1.0, 2.0]),
               "size@layer2": torch.tensor([0.0, 0.5])}  # fmt: skip
    targets = {"even": torch.tensor([1.0, 0.0]), "size": torch.tensor([1.5, 2.0])}
    masks = {t: torch.ones(2, dtype=torch.bool) for t in targets}
    specs = {"even": TaskSpec("even", "binary"), "size": TaskSpec("size", "regression")}
    total, task_losses = multitask_loss(outputs, targets, masks, specs, WEIGHTS)
    vector, present = mean.stack(task_losses)
    assert mean.combine(vector, present, 0, 0).item() == pytest.approx(total.item() / 3)
    summed = Balancer("sum", OBJECTIVES, weights=WEIGHTS)
    assert summed.combine(vector, present, 0, 0).item() == pytest.approx(total.item())


def test_mean_with_static_weights_keeps_k_when_a_task_is_unlabelled():
    """An absent task is imputed with its last loss (no gradient), so the others keep their
    scale w_k / K from step to step."""
    mean = Balancer("mean", OBJECTIVES, weights=WEIGHTS)
    _combine(mean, torch.tensor([0.7, 1.3, 2.9]), torch.ones(3, dtype=torch.bool))
    combined = _combine(mean, torch.tensor([5.0, 1.0, 2.0]), torch.tensor([False, True, True]))
    assert combined.item() == pytest.approx((2.0 * 0.7 + 0.5 * 1.0 + 0.5 * 2.0) / 3)
    assert mean.weights_dict() == pytest.approx({"size": 0.5 / 3, "size@layer2": 0.5 / 3})


def test_static_weights_are_refused_where_a_method_sets_its_own():
    with pytest.raises(UserError, match="tasks.size.weight"):
        Balancer("upgrad", OBJECTIVES, weights={"size": 0.5})
    with pytest.raises(UserError, match="tasks.even.weight"):
        Balancer("uw", OBJECTIVES, weights={"even": 2.0})
    with pytest.raises(UserError, match="tasks.colour.weight"):
        Balancer("mean", OBJECTIVES, weights={"colour": 2.0})  # no such task
    # Weights of 1 (every recipe's default) are accepted by every method.
    Balancer("upgrad", OBJECTIVES, weights=dict.fromkeys(WEIGHTS, 1.0))


# ---------------------------------------------------------------------------------------------
# A multilabel task with a single label


def test_one_label_multilabel_task_trains_evaluates_and_predicts():
    """One label: the head used to squeeze its output to `[B]` while the data pipeline gives
    `[B, 1]` targets, so the loss failed; torchmetrics also refuses `num_labels=1`."""
    torch.manual_seed(0)
    task = TaskSpec("spotted", "multilabel", 1, class_names=("spot",))
    model = MultiTaskModel(create_backbone("timm:test_resnet"), [task]).eval()
    # Targets as the real pipeline encodes them: label cells -> multi-hot rows -> tensors.
    # An empty list is "no label applies"; None is a missing label (masked out).
    cells = [["spot"], [], "spot", None, ["spot"], []]
    encoded, _ = encode_task(task, ["spotted"], [cells])
    target, mask = _targets(task, encoded)
    assert target.shape == (6, 1) and mask.tolist() == [True, True, True, False, True, True]

    outputs = model(torch.randn(6, 3, 32, 32))
    assert outputs["spotted"].shape == (6, 1)  # like its targets, and like any L-label task
    total, losses = multitask_loss(
        outputs, {"spotted": target}, {"spotted": mask}, {"spotted": task}, {}
    )
    expected = F.binary_cross_entropy_with_logits(outputs["spotted"][mask], target[mask])
    assert total.item() == pytest.approx(expected.item())
    total.backward()  # a graph to train from
    assert model.heads["spotted"].net[-1].weight.grad is not None

    collection = task_metrics(task)
    update(collection, task, outputs["spotted"].detach(), target, mask)
    values = compute(collection)
    # With one label, the macro average over labels is the binary metric of that label.
    probs = outputs["spotted"].detach().sigmoid()[mask].reshape(-1)
    labels = target[mask].reshape(-1).long()
    reference = {
        "accuracy": tm.functional.accuracy(probs, labels, task="binary"),
        "f1": tm.functional.f1_score(probs, labels, task="binary"),
        "auroc": tm.functional.auroc(probs, labels, task="binary"),
    }
    assert values.keys() == reference.keys()
    for name, value in reference.items():
        assert values[name] == pytest.approx(float(value)), name

    probabilities = prediction(task, outputs["spotted"].detach())
    described = describe_prediction(task, probabilities[0])
    score = float(probabilities[0, 0])
    assert described == {"labels": ["spot"] if score >= 0.5 else [], "scores": [round(score, 4)]}
