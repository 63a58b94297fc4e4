"""Training: only the adapter weights learn. `trainer.py` tells the story top-down."""

from .runtime import Interrupted
from .trainer import Outcome, train

__all__ = ["Interrupted", "Outcome", "train"]
