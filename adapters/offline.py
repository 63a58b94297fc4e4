"""No network at run time: bitsandbytes is imported without its hub fetch (below every step).

On CPUs with AVX512-BF16, importing bitsandbytes asks the `kernels` package for an optional
4-bit GEMM kernel from the Hugging Face Hub: a DNS lookup and an HTTPS request at import time,
then a logged failure on a machine without network. The fallback kernel is what runs either
way. peft imports bitsandbytes when it is installed, so any of our modules may be the first to
pull it in: `install()` (run by the package's `__init__`, cheaply: nothing heavy is imported
here) puts a finder in front of the import system that runs bitsandbytes' own import with the
hub's offline switch set, and only for its duration. A kernel already in the local cache is
still used; `adapters push`/`pull`, which read the switch later, are unaffected.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Iterator

_PACKAGE = "bitsandbytes"
# The loggers that report the skipped fetch: expected here, so kept out of the user's console.
_QUIET = ("bitsandbytes", "kernels")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The Hugging Face Hub's offline switch set (and its fetch warnings quiet) for a block."""
    import huggingface_hub.constants as hub_constants  # only when bitsandbytes is imported

    saved = hub_constants.HF_HUB_OFFLINE
    levels = {name: logging.getLogger(name).level for name in _QUIET}
    hub_constants.HF_HUB_OFFLINE = True
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class _OfflineLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with hub_offline():
            self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # the real one from now on

    def __getattr__(self, name: str):  # resource readers and the like: the real loader's
        return getattr(self._loader, name)


class _OfflineFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _PACKAGE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineLoader(spec.loader)
        return spec


def install() -> None:
    """Route bitsandbytes' first import through `hub_offline` (idempotent)."""
    if _PACKAGE in sys.modules or any(isinstance(f, _OfflineFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _OfflineFinder())
