"""Regression tests for defects found in review: a one-label multilabel task, static weights
with `multitask.method: mean`, and a feature cache on disk that must not hold every feature in
memory while it is built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchmetrics as tm

from transferkit.data.dataset import _targets
from transferkit.data.labels import encode_task
from transferkit.engine.losses import multitask_loss
from transferkit.engine.metrics import compute, prediction, task_metrics, update
from transferkit.engine.run import describe_prediction
from transferkit.models import MultiTaskModel, TaskSpec, create_backbone

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
