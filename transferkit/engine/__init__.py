"""The fine-tuning engine: one training run (set-up, step loop, strategies, evaluation)."""

from transferkit.engine.trainer import train

__all__ = ["train"]
