"""How a batch reaches the model: images, or backbone features read from the feature cache
(`transferkit.features`), whose batches carry "features" instead of "image"."""

from __future__ import annotations

import torch


def model_outputs(model, batch: dict, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """The model's outputs for a batch of images, or of cached features."""
    if "features" in batch:
        return model(features=batch["features"])
    images = batch["image"]
    return model(images.contiguous(memory_format=torch.channels_last) if channels_last else images)
