"""Training: only the adapter weights learn. `trainer.py` tells the story top-down."""

from .loop import Interrupted
from .trainer import train

__all__ = ["Interrupted", "train"]
