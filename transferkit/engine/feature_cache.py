"""Feature caching: when a phase trains only the heads on a frozen, deterministic backbone, run
the backbone once over the data and train the heads from the stored features.

A phase qualifies when no backbone parameter trains, normalization statistics are frozen, the
train transforms are deterministic (`data.augment: none`), the backbone has no active dropout or
drop-path, and there are no auxiliary heads (they need feature maps). `train.feature_cache`:
`auto` caches where a phase qualifies, `force` also demands it of every frozen phase (an error
says why one does not qualify), `forbid` never caches. Features are kept in memory, or written to disk as
an Arrow dataset (`datasets`) when larger than `train.feature_cache_max_gb`.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader, Dataset

from transferkit.errors import UserError
from transferkit.models.backbone import Backbone


def _stochastic_layers(backbone: Backbone) -> list[str]:
    names = []
    for name, module in backbone.model.named_modules():
        kind = type(module).__name__
        rate = (
            getattr(module, "p", None) if "Dropout" in kind else getattr(module, "drop_prob", None)
        )
        if ("Dropout" in kind or "DropPath" in kind or "DropBlock" in kind) and rate:
            names.append(name)
    return names


def why_not_cacheable(backbone: Backbone, augment: str, has_aux_heads: bool) -> list[str]:
    """Reasons the current phase cannot train from cached features (empty: it can)."""
    reasons = []
    if any(p.requires_grad for p in backbone.parameters()):
        reasons.append("backbone parameters train in this phase")
    if backbone.freeze_spec.norm == "train":
        reasons.append("normalization statistics update (@norm=train)")
    if augment != "none":
        reasons.append(f"train augmentation is random (data.augment: {augment})")
    if has_aux_heads:
        reasons.append("auxiliary heads need feature maps")
    stochastic = _stochastic_layers(backbone)
    if stochastic:
        reasons.append(f"the backbone has active dropout/drop-path ({stochastic[0]}, ...)")
    return reasons


def decide(
    mode: str, backbone: Backbone, augment: str, has_aux_heads: bool, phase: int
) -> tuple[bool, str]:
    """Whether this phase trains from cached features, and a line for the log that says why."""
    if mode == "forbid":
        return False, "features: computed every step (train.feature_cache: forbid)"
    reasons = why_not_cacheable(backbone, augment, has_aux_heads)
    if not reasons:
        return True, "features: cached once for this phase (frozen, deterministic backbone)"
    frozen = not any(p.requires_grad for p in backbone.parameters())
    if mode == "force" and frozen:
        raise UserError(
            f"train.feature_cache: force, but phase {phase} cannot use cached features: {'; '.join(reasons)}. "
            "Use feature_cache: auto to fall back to computing them."
        )
    return False, f"features: computed every step ({'; '.join(reasons)})"


class CachedFeatures(Dataset):
    """Samples `{"features", "targets", "mask", "index"}` from stored backbone features."""

    def __init__(
        self, features, targets: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> None:
        self.features, self.targets, self.masks = features, targets, masks

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        row = self.features[index]
        return {
            "features": row["features"] if isinstance(row, dict) else row,
            "targets": {t: v[index] for t, v in self.targets.items()},
            "mask": {t: v[index] for t, v in self.masks.items()},
            "index": index,
        }


@torch.no_grad()
def build_cache(
    backbone: Backbone,
    dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    max_gb: float,
    disk_dir: Path,
) -> CachedFeatures:
    """Run the (frozen) backbone once over `dataset`, a `TaskImageDataset`, in its current mode."""
    from transferkit.data import collate

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    size_gb = len(dataset) * backbone.num_features * 4 / 1e9
    on_disk = size_gb > max_gb
    chunks, order = [], []
    for batch in loader:
        chunks.append(backbone(batch["image"].to(device)).float().cpu())
        order.append(batch["index"])
    features = torch.cat(chunks)
    # Position k holds sample k; its row differs only when an unreadable image was replaced by
    # the next readable one, whose targets then go with it, as on the image path.
    rows = torch.cat(order)
    if on_disk:
        disk_dir.mkdir(parents=True, exist_ok=True)
        table = datasets.Dataset.from_dict({"features": features.numpy()})
        table.save_to_disk(str(disk_dir))
        stored = datasets.load_from_disk(str(disk_dir)).with_format("torch")
    else:
        stored = features
    targets = {t: v[rows] for t, v in dataset.targets.items()}
    return CachedFeatures(stored, targets, {t: v[rows] for t, v in dataset.masks.items()})
