"""adapters: train, merge, evaluate and swap LoRA adapters for causal LMs."""

from .adapter import inspect_adapter, load_adapter, save_adapter
from .config import RunConfig, load_recipe
from .errors import AdaptersError
from .model import load_base

__all__ = ["AdaptersError", "RunConfig", "inspect_adapter", "load_adapter", "load_base",
           "load_recipe", "save_adapter", "train"]
__version__ = "0.1.0"


def train(cfg, resume=None, progress=False):
    """Train an adapter from a RunConfig (or dict); returns the output folder. See train.py."""
    from .train import train as _train

    return _train(cfg, resume=resume, progress=progress)
