"""The hand-written row of `make bench-fit`: plain PyTorch LP-FT on a plan's data, several tasks.

What a careful user would write without transferkit (bench/lpft_by_hand.py, the loop of
bench/quality.py's hand-written row, here on the sets' several tasks and missing labels): the
plan's backbone and weights, its training rows and image size (the same 80% that `fit`'s runs
train on), the backbone's evaluation transform (no augmentation), one linear head per task, the
plan's epochs (16 at these sizes): the first half a linear probe on frozen features, the second
half every parameter. Cross-entropy for multiclass, binary cross-entropy for binary, mean
squared error on standardized targets for regression, each over its labelled rows only,
summed over the tasks. Scored after the last epoch on the plan's test split: the mean over the
tasks of accuracy or R^2 (as `fit_score`), and the first task's accuracy.

    python -m bench.fit_handwritten PLAN.yaml --json OUT.json [--epochs N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from bench.lpft_by_hand import lpft_by_hand


class _Heads(torch.nn.ModuleDict):
    """One linear head per task: features -> {task: outputs}."""

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.items()}


def _tensors(split, tasks, transform) -> tuple[torch.Tensor, dict, dict]:
    from transferkit.data import TaskImageDataset, collate

    dataset = TaskImageDataset(split, tasks, transform)
    batch = collate([dataset[i] for i in range(len(dataset))])
    return batch["image"], batch["targets"], batch["mask"]


def _loss(outputs: dict, targets: dict, mask: dict, tasks, scale: dict) -> torch.Tensor:
    total = torch.zeros(())
    for task in tasks:
        keep = mask[task.name]
        if not keep.any():
            continue
        out, target = outputs[task.name][keep], targets[task.name][keep]
        if task.kind == "multiclass":
            total = total + F.cross_entropy(out, target.long())
        elif task.kind == "binary":
            total = total + F.binary_cross_entropy_with_logits(out.squeeze(1), target.float())
        else:
            mean, std = scale[task.name]
            total = total + F.mse_loss(out.squeeze(1), (target.float().view(-1) - mean) / std)
    return total


def _scores(outputs: dict, targets: dict, mask: dict, tasks, scale: dict) -> dict[str, float]:
    scores = {}
    for task in tasks:
        keep = mask[task.name]
        out, target = outputs[task.name][keep], targets[task.name][keep]
        if task.kind == "multiclass":
            scores[task.name] = float((out.argmax(1) == target.long()).float().mean())
        elif task.kind == "binary":
            scores[task.name] = float(((out.squeeze(1) > 0) == target.bool()).float().mean())
        else:
            mean, std = scale[task.name]
            truth = target.float().view(-1)
            residual = ((out.squeeze(1) * std + mean - truth) ** 2).sum()
            scores[task.name] = float(1 - residual / ((truth - truth.mean()) ** 2).sum())
    return scores


def hand_written_lpft(plan: Path, epochs: int | None = None) -> dict:
    """Train LP-FT by hand on `plan`'s data; the test scores (see the module docstring)."""
    from transferkit.data import build_transforms, load_data
    from transferkit.models import create_backbone
    from transferkit.recipes import load_recipe

    recipe = load_recipe(plan)
    epochs = epochs or recipe.train.epochs
    torch.manual_seed(recipe.seed)
    loaded = load_data(recipe.data, recipe.tasks, recipe.seed)
    tasks = [t for t in loaded.tasks if t.kind != "multilabel"]  # the sets have none
    backbone = create_backbone(recipe.model.backbone, recipe.model.weights)
    model = backbone.model
    transform = build_transforms(backbone.data_config, False, "none", recipe.data.image_size)
    x_train, y_train, m_train = _tensors(loaded.splits["train"], tasks, transform)
    x_test, y_test, m_test = _tensors(loaded.splits["test"], tasks, transform)
    scale = {}
    for task in tasks:
        if task.kind == "regression":
            values = y_train[task.name][m_train[task.name]].float().view(-1)
            scale[task.name] = (values.mean(), values.std().clamp_min(1e-6))
    model.eval()
    with torch.no_grad():
        features = model(x_train)
    heads = _Heads({t.name: torch.nn.Linear(features.shape[1], t.num_outputs) for t in tasks})

    def loss_of(outputs: dict, rows: torch.Tensor) -> torch.Tensor:
        targets, mask = ({n: v[rows] for n, v in part.items()} for part in (y_train, m_train))
        return _loss(outputs, targets, mask, tasks, scale)

    lpft_by_hand(model, heads, features, x_train, loss_of, epochs,
                 torch.Generator().manual_seed(recipe.seed))  # fmt: skip
    model.eval()
    with torch.no_grad():
        feats = model(x_test)
        scores = _scores(heads(feats), y_test, m_test, tasks, scale)
    return {"score": sum(scores.values()) / len(scores), "first": scores[tasks[0].name],
            "tasks": scores}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--epochs", type=int, help="default: the plan's train.epochs")
    args = parser.parse_args(argv)
    args.json.write_text(json.dumps(hand_written_lpft(args.plan, args.epochs)))


if __name__ == "__main__":
    main()
