"""Regression tests for defects found in review: a one-label multilabel task, static weights
with `multitask.method: mean`, and a feature cache on disk that must not hold every feature in
memory while it is built."""

from __future__ import annotations

import weakref
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
import torchmetrics as tm

from transferkit.balancing import Balancer
from transferkit.data.dataset import task_targets
from transferkit.data.labels import encode_task
from transferkit.engine.losses import multitask_loss
from transferkit.engine.metrics import compute_metrics, task_metrics, update_metrics
from transferkit.errors import UserError
from transferkit.features.cache import CachedFeatures, build_cache
from transferkit.inference.run import describe_prediction
from transferkit.models import MultiTaskModel, TaskSpec, create_backbone, probabilities

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
    target, mask = task_targets(task, encoded)
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
    update_metrics(collection, task, outputs["spotted"].detach(), target, mask)
    values = compute_metrics(collection)
    # With one label, the macro average over labels is the binary metric of that label.
    probs = outputs["spotted"].detach().sigmoid()[mask].reshape(-1)
    labels = target[mask].reshape(-1).long()
    reference = {
        "accuracy": tm.functional.accuracy(probs, labels, task="binary"),
        "f1": tm.functional.f1_score(probs, labels, task="binary"),
        "auroc": tm.functional.auroc(probs, labels, task="binary"),
        "ece": tm.functional.calibration_error(probs, labels, task="binary"),
    }
    assert values.keys() == reference.keys()
    for name, value in reference.items():
        assert values[name] == pytest.approx(float(value)), name

    predicted = probabilities(task, outputs["spotted"].detach())
    described = describe_prediction(task, predicted[0])
    score = float(predicted[0, 0])
    assert described == {"labels": ["spot"] if score >= 0.5 else [], "scores": [round(score, 4)]}


# ---------------------------------------------------------------------------------------------
# The feature cache on disk is built in chunks


class _Images(torch.utils.data.Dataset):
    """What `build_cache` reads of a `TaskImageDataset`: samples, and `targets`/`masks`."""

    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, 32, 32, generator=generator)
        self.targets = {"size": torch.arange(count, dtype=torch.float32)}
        self.masks = {"size": torch.arange(count) % 3 != 0}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "targets": {t: v[index] for t, v in self.targets.items()},
            "mask": {t: v[index] for t, v in self.masks.items()},
            "index": index,
        }


def _all_rows(cache: CachedFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = [cache[i] for i in range(len(cache))]
    return (
        torch.stack([r["features"] for r in rows]),
        torch.stack([r["targets"]["size"] for r in rows]),
        torch.stack([r["mask"]["size"] for r in rows]),
    )


def test_feature_cache_on_disk_streams_chunks_and_matches_memory(tmp_path: Path, monkeypatch):
    """Above `max_gb` the cache goes to disk; it used to compute every feature into one tensor in
    RAM first, so the limit bounded nothing. Live backbone outputs are counted through weak
    references: each is a chunk of `batch_size` rows, and all of them stayed alive before."""
    count, batch_size = 24, 4
    dataset = _Images(count)
    backbone = create_backbone("timm:test_resnet").eval()
    original = backbone.forward
    live = {"rows": 0, "peak": 0}

    def release(rows: int) -> None:
        live["rows"] -= rows

    def counted(images: torch.Tensor) -> torch.Tensor:
        out = original(images)
        live["rows"] += out.shape[0]
        live["peak"] = max(live["peak"], live["rows"])
        weakref.finalize(out, release, out.shape[0])
        return out

    monkeypatch.setattr(backbone, "forward", counted)
    args = {"batch_size": batch_size, "num_workers": 0, "device": torch.device("cpu")}
    disk = build_cache(backbone, dataset, **args, max_gb=0.0, disk_dir=tmp_path / "train")
    assert live["peak"] <= batch_size < count  # one chunk at a time, not the whole split
    # The features are read back from the Arrow file (memory-mapped), not held in RAM.
    assert isinstance(disk.features, datasets.Dataset)
    files = [Path(f["filename"]) for f in disk.features.cache_files]
    assert files and all(f.parent == tmp_path / "train" for f in files)

    memory = build_cache(backbone, dataset, **args, max_gb=1.0, disk_dir=tmp_path / "unused")
    assert isinstance(memory.features, torch.Tensor) and not (tmp_path / "unused").exists()
    assert len(disk) == len(memory) == count
    for on_disk, in_memory in zip(_all_rows(disk), _all_rows(memory)):
        assert torch.equal(on_disk, in_memory)
    assert torch.equal(_all_rows(memory)[1], dataset.targets["size"])  # sample k at position k
