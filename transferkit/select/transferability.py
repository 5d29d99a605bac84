"""`transferkit rank RECIPE --backbones a,b,c [--groups ...]`: which backbone (or which layer
of one) to fine-tune, scored on the recipe's training data from frozen features alone.

Each candidate backbone runs once over the training split with the eval transform (its own
preprocessing, at the recipe's `data.image_size`), in eval mode: one feature pass per backbone.
With `groups`, that same pass also keeps the feature map after each named layer group, pooled
(global average over space, or over tokens), and every group becomes a candidate of its own.
Every task of the recipe is then scored from the features of its labelled rows with LogME and a
leave-one-out kNN probe (`transferkit.select.scores`). No head is trained.

A candidate is written `SOURCE:NAME[@WEIGHTS]`: WEIGHTS as the recipe key `model.weights`
(`pretrained`, the default; `none` for random weights; a weights file or a run folder).
Without candidates, the recipe's own backbone and weights are scored.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from transferkit.data import (
    TaskImageDataset,
    build_transforms,
    collate,
    is_streamed,
    load_data,
    num_workers,
)
from transferkit.errors import UserError
from transferkit.inference import resolve_device
from transferkit.models import TaskSpec, create_backbone, parse_backbone_name, resolve_auto_weights
from transferkit.recipes import Recipe, load_recipe
from transferkit.select.scores import KNN_K, knn_score, logme

SCORES = ("logme", "knn")
OUTPUT = "(output)"  # the row of a backbone's pooled output, what the task heads see


@dataclass(frozen=True)
class Candidate:
    """A backbone with its weights; `groups` adds one row per named layer group."""

    backbone: str
    weights: str | None = "pretrained"

    @property
    def label(self) -> str:
        return f"{self.backbone}@{self.weights or 'none'}"


@dataclass
class Scored:
    """One row of the ranking: a backbone's output or one of its groups, with its scores."""

    candidate: str
    group: str
    dim: int
    seconds: float  # the backbone's feature pass (shared by its group rows)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> score -> value

    @property
    def name(self) -> str:
        return self.candidate if self.group == OUTPUT else f"{self.candidate}/{self.group}"


def primary_task(recipe: Recipe) -> str:
    """The task the ranking sorts by: the one `train.monitor` watches, else the first. (Scores
    of different tasks have different scales, a regression's LogME is not a classifier's, so
    they are not averaged.)"""
    if recipe.train.monitor:
        parts = recipe.train.monitor.split("/")
        if len(parts) == 3 and parts[1] in recipe.tasks:
            return parts[1]
    return next(iter(recipe.tasks))


def _weights(recipe: Recipe) -> str | None:
    """The recipe's weights, `auto` resolved as a run would."""
    return resolve_auto_weights(recipe.model.backbone, recipe.model.weights)[0]


def parse_candidate(spec: str) -> Candidate:
    """`timm:resnet18`, `timm:resnet18@none`, `timm:test_resnet@runs/digits_source`."""
    backbone, _, weights = spec.strip().partition("@")
    parse_backbone_name(backbone)  # a clear error for a malformed name, before any work
    if not weights:
        return Candidate(backbone)
    if weights.lower() in ("none", "random"):
        return Candidate(backbone, None)
    if weights.lower() != "pretrained" and not Path(weights).exists():
        raise UserError(
            f"--backbones {spec}: weights {weights!r} is neither pretrained, none, nor an "
            "existing file or run folder"
        )
    return Candidate(backbone, weights)


def _task_targets(task: TaskSpec, targets: torch.Tensor) -> np.ndarray:
    """A task's labels as the `[N, K]` columns the scores read: one-hot classes (binary: two
    classes), 0/1 labels (multilabel), or standardized values (regression: LogME has no bias
    and a fixed prior scale, so the values are centred and scaled per column)."""
    if task.kind == "multiclass":
        return np.eye(task.num_outputs)[targets.long().numpy()]
    values = targets.double().numpy().reshape(len(targets), -1)
    if task.kind == "binary":
        return np.concatenate([1.0 - values, values], axis=1)
    if task.kind == "regression":
        return (values - values.mean(axis=0)) / np.maximum(values.std(axis=0), 1e-12)
    return values


def pool(feature_map: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A group's feature map as one vector per image: the mean over space or tokens."""
    if feature_map.ndim == 4:
        return feature_map.mean(dim=(1, 2) if channels_last else (2, 3))
    if feature_map.ndim == 3:  # [B, tokens, C] (ViT blocks)
        return feature_map.mean(dim=1)
    return feature_map.flatten(1)


@torch.no_grad()
def feature_pass(backbone, dataset, groups: list[str], batch_size: int, device, workers: int):
    """One pass of the frozen backbone: pooled output and pooled group maps, targets, masks."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    backbone = backbone.to(device).eval()
    channels_last = getattr(backbone.model, "output_fmt", "NCHW") == "NHWC"
    rows: dict[str, list[torch.Tensor]] = {OUTPUT: [], **{g: [] for g in groups}}
    targets: dict[str, list[torch.Tensor]] = {}
    masks: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        pooled, maps = backbone.forward_with_maps(batch["image"].to(device), groups)
        rows[OUTPUT].append(pooled.float().cpu())
        for group in groups:
            rows[group].append(pool(maps[group], channels_last).float().cpu())
        for name, value in batch["targets"].items():
            targets.setdefault(name, []).append(value)
            masks.setdefault(name, []).append(batch["mask"][name])
    cat = {k: torch.cat(v) for k, v in rows.items()}
    return (
        cat,
        {k: torch.cat(v) for k, v in targets.items()},
        {k: torch.cat(v) for k, v in masks.items()},
    )


@torch.no_grad()
def _stored_features(backbone, name: str, kwargs: dict, dataset, batch_size: int, device,
                    workers: int, cfg):  # fmt: skip
    """The pooled output's features through the shared feature cache (engine.feature_store):
    the entry a linear probe of this backbone on this data reads too, so ranking candidates
    and then probing the winner pay for one backbone pass, and ranking again for none."""
    from transferkit.features import (
        FeatureStore,
        backbone_id,
        cache_root,
        shared_cache,
    )

    backbone.freeze("all")  # the key of a fully frozen backbone, as a probe's
    store = FeatureStore(cache_root(cfg.feature_cache_dir), cfg.feature_cache_limit_gb)
    cached, _ = shared_cache(store, backbone.to(device).eval(), backbone_id(name, kwargs), dataset,
                             batch_size, workers, device, cfg.feature_cache_max_gb)  # fmt: skip
    rows, targets, masks = [], {}, {}
    for batch in DataLoader(cached, batch_size=batch_size, collate_fn=collate):
        rows.append(batch["features"].float().cpu())
        for task, value in batch["targets"].items():
            targets.setdefault(task, []).append(value)
            masks.setdefault(task, []).append(batch["mask"][task])
    return (
        {OUTPUT: torch.cat(rows)},
        {k: torch.cat(v) for k, v in targets.items()},
        {k: torch.cat(v) for k, v in masks.items()},
    )


def _score_features(features: torch.Tensor, tasks, targets, masks) -> dict[str, dict[str, float]]:
    """LogME and kNN of one feature matrix for every task, on the rows that task labels."""
    scores = {}
    for task in tasks:
        keep = masks[task.name].bool()
        f = features[keep].double().numpy()
        if len(f) < 2:
            raise UserError(f"task {task.name!r}: fewer than 2 labelled training rows to score")
        y = _task_targets(task, targets[task.name][keep])
        scores[task.name] = {"logme": logme(f, y), "knn": knn_score(f, y, task.kind)}
    return scores


def _groups_of(backbone, groups: list[str] | None) -> list[str]:
    if not groups:
        return []
    if groups == ["all"]:
        return list(backbone.group_names)
    return [backbone.group(g).name for g in groups]  # unknown names: one clear error


def rank(
    recipe: Recipe | str,
    candidates: list[str] | None = None,
    groups: list[str] | None = None,
    overrides: list[str] | None = None,
    device=None,
    batch_size: int | None = None,
    progress: bool = True,
) -> list[Scored]:
    """Score every candidate (`SOURCE:NAME[@WEIGHTS]`; default: the recipe's backbone) and,
    with `groups` (names, indices or `["all"]`), each of those layer groups of every candidate.
    Rows come back best first by the LogME of `primary_task`; the other scores are reported."""
    from tqdm.auto import tqdm

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides or [])
    chosen = (
        [parse_candidate(c) for c in candidates]
        if candidates
        else [Candidate(recipe.model.backbone, _weights(recipe))]
    )
    if len({c.label for c in chosen}) < len(chosen):
        raise UserError("--backbones names the same backbone and weights twice")
    for candidate in chosen:  # names and groups checked on the structure, before any work
        _groups_of(create_backbone(candidate.backbone, None, device="meta"), groups)
    if is_streamed(recipe.data):
        raise UserError(
            "rank scores backbones on the whole training split, and this recipe streams it "
            f"({recipe.data.source}); rank on a sample saved as an image folder or manifest"
        )
    data = load_data(recipe.data, recipe.tasks, recipe.seed)
    size = batch_size or recipe.train.eval_batch_size or recipe.train.batch_size or 64
    device = resolve_device(device)
    workers = num_workers(recipe.data.num_workers)
    rows: list[Scored] = []
    for candidate in tqdm(chosen, desc="rank", unit="backbone", disable=not progress):
        # The recipe's constructor arguments belong to its own backbone only.
        kwargs = recipe.model.kwargs if candidate.backbone == recipe.model.backbone else {}
        start = time.perf_counter()
        backbone = create_backbone(candidate.backbone, candidate.weights, **kwargs)
        backbone.use_image_size(recipe.data.image_size)  # as training does: the same cache key
        names = _groups_of(backbone, groups)  # scored besides the pooled output
        transform = build_transforms(backbone.data_config, False, "none", recipe.data.image_size)
        dataset = TaskImageDataset(data.splits["train"], data.tasks, transform,
                                   bad_images=recipe.data.bad_images)  # fmt: skip
        cfg = recipe.train
        if not names and cfg.feature_cache != "forbid" and cfg.feature_cache_shared:
            cached = _stored_features(backbone, candidate.backbone, kwargs, dataset, size, device,
                                     workers, cfg)  # fmt: skip
            features, targets, masks = cached
        else:  # group maps are not what the store keeps: one pass with hooks
            features, targets, masks = feature_pass(backbone, dataset, names, size, device, workers)
        seconds = time.perf_counter() - start
        for group in [*names, OUTPUT]:
            scores = _score_features(features[group], data.tasks, targets, masks)
            rows.append(Scored(candidate.label, group, features[group].shape[1], seconds, scores))
        del backbone
    key = primary_task(recipe)
    return sorted(rows, key=lambda r: r.scores[key]["logme"], reverse=True)


def rank_table(rows: list[Scored], primary: str) -> str:
    """The ranking as text: one line per row, LogME and kNN per task."""
    tasks = list(rows[0].scores)
    width = max(len(r.name) for r in rows)
    head = " ".join(f"{f'{t} {s}':>16s}" for t in tasks for s in SCORES)
    lines = [f"{'#':>2s} {'candidate':{width}s} {'dim':>5s} {head} {'pass s':>7s}"]
    for i, r in enumerate(rows, 1):
        values = " ".join(f"{r.scores[t][s]:16.4f}" for t in tasks for s in SCORES)
        lines.append(f"{i:2d} {r.name:{width}s} {r.dim:5d} {values} {r.seconds:7.1f}")
    lines.append(
        f"sorted by {primary} logme. LogME: log evidence per sample (higher is better); kNN: "
        "leave-one-out accuracy "
        f"(R^2 for regression), k={KNN_K}"
    )
    return "\n".join(lines)


def write_ranking(
    rows: list[Scored], recipe_name: str, output: str | Path = "."
) -> tuple[Path, Path]:
    """`rank_<recipe>.json` and `rank_<recipe>.png` in `output`."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"rank_{recipe_name}.json"
    records = [{"name": r.name, **asdict(r)} for r in rows]
    json_path.write_text(json.dumps({"recipe": recipe_name, "rows": records}, indent=2))
    return json_path, plot(rows, folder / f"rank_{recipe_name}.png", recipe_name)


def plot(rows: list[Scored], path: Path, title: str) -> Path:
    """One panel per task and score: a bar per candidate, the ranking's order top down."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone

    tasks = list(rows[0].scores)
    figure = Figure(figsize=(5 * len(SCORES), 0.9 + 0.35 * len(rows) * len(tasks)))
    axes = figure.subplots(len(tasks), len(SCORES), squeeze=False)
    names = [r.name for r in rows][::-1]
    for i, task in enumerate(tasks):
        for j, score in enumerate(SCORES):
            axis = axes[i][j]
            axis.barh(names, [r.scores[task][score] for r in rows][::-1], color=f"C{j}")
            axis.set_title(f"{task}: {score}", fontsize=9)
            axis.tick_params(labelsize=7)
            axis.grid(axis="x", alpha=0.3)
    figure.suptitle(f"transferability on {title} (frozen features)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
