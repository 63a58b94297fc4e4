"""Compiled decoder blocks (regional compilation) and when `train.compile: auto` uses them.

Each decoder block is compiled, not the whole model: the blocks share one code object, so
TorchDynamo traces one block and reuses the graph for every layer (parameters are graph
inputs), and the compile time is that of one block. Inductor's caches go under
$ADAPTERS_HOME/compile-cache, so a second run of the same shapes starts warm. Shapes that vary
(packed rows of varying length) are marked dynamic after their first change, not recompiled
every step.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from ..model import adapters_home
from .offload import decoder_blocks

# Below this many steps a compile (~30-60 s for a block on first use) does not pay back.
AUTO_MIN_STEPS = 300


def choose(setting: bool | str, device: str, steps: int,
           untested: str | None = None) -> tuple[bool, str]:
    """(compile?, why) for `train.compile` on this device and run length; `auto` stays off
    with options not yet tested compiled (`untested` names them)."""
    if setting in (True, "true"):
        return True, "train.compile=true"
    if setting in (False, "false"):
        return False, "train.compile=false"
    if setting != "auto":
        raise ConfigError(f"train.compile: {setting!r} is not one of auto, true, false")
    if untested:
        return False, (f"auto: off with {untested}, not yet tested compiled; set "
                       "train.compile=true to force")
    if not device.startswith("cuda"):
        return False, ("auto: off on CPU, where compiled blocks measured no faster than eager "
                       "and cost 13-66 s to compile; set train.compile=true to force")
    if steps < AUTO_MIN_STEPS:
        return False, (f"auto: {steps} steps is too short to pay back the compile time "
                       f"(on from {AUTO_MIN_STEPS} steps)")
    return True, f"auto: {steps} steps on {device} pay back the compile time"


def cache_dir() -> str:
    return str(adapters_home() / "compile-cache")


def compile_blocks(model) -> int:
    """Compile every decoder block in place (module names unchanged); returns how many."""
    # Inductor reads its cache location from the environment; a user's own setting wins.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir())
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(dynamic=None)
    return len(blocks)
