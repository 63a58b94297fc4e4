"""adapters: train, merge, evaluate and swap LoRA adapters for causal LMs."""

from .adapter import inspect_adapter, load_adapter, save_adapter
from .config import RunConfig, load_recipe
from .errors import AdaptersError
from .model import load_base
from .training import train

__all__ = ["AdaptersError", "RunConfig", "inspect_adapter", "load_adapter", "load_base",
           "load_recipe", "save_adapter", "train"]
__version__ = "0.1.0"
