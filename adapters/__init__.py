"""adapters: train, merge, evaluate and swap LoRA adapters for causal LMs.

The public names below load on first use (PEP 562): `import adapters` (and so the command
line's `adapters --help`) does not pull in torch, transformers and peft until one is asked for.
"""

from __future__ import annotations

import importlib

from . import offline

offline.install()  # before anything can import peft, hence bitsandbytes: no hub fetch

# public name -> the module of this package that defines it
_PUBLIC = {"AdaptersError": "errors", "RunConfig": "config", "load_recipe": "config",
           "inspect_adapter": "adapter", "load_adapter": "adapter", "save_adapter": "adapter",
           "load_base": "model", "train": "training"}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
