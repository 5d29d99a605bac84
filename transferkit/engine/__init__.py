"""The fine-tuning engine: freeze schedule, optimizer, losses, metrics, the Accelerate loop."""

from transferkit.engine.run import load, load_run
from transferkit.engine.trainer import train

__all__ = ["load", "load_run", "train"]
