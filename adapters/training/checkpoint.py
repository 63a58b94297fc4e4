"""Training checkpoints that survive crashes, and exact resume from them.

`checkpoints/step-NNNNNN/` holds the adapter (peft format + manifest), the optimiser state,
every RNG state and the data position. It is written into a temporary sibling, fsynced and
renamed, so a kill at any moment leaves the previous checkpoint whole. No pickle is ever
loaded with code execution: optimiser state goes through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig, from_dict
from ..errors import TrainingError
from ..io import atomic_dir, clean_stale_tmp

STATE_FILE = "state.json"
OPTIM_FILE = "optimizer.pt"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
log = logging.getLogger(__name__)

# Recipe keys whose change does not alter the trajectory of the run: logging, saving, and the
# speed options (they change how a step is computed, not what: at most float rounding).
HARMLESS = {"train.steps", "train.epochs", "train.eval_every", "train.save_every",
            "train.keep_checkpoints", "train.log_every", "train.max_bad_steps", "output.dir",
            "data.eval", "train.dist_timeout_s", "output.license", "output.datasets",
            "train.compile", "train.fused_lora", "train.gradient_checkpointing",
            "train.offload_checkpoints", "train.report_to", "train.dpo_reference",
            "train.attention", "train.liger", "train.jobs_per_forward"}


def rng_state() -> dict[str, Any]:
    state = {"python": _jsonable(random.getstate()),
             "numpy": _jsonable(np.random.get_state()),
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step:06d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without state.json is not complete)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir()
             if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(ckpt_root: Path, step: int, write_adapter, optimizer, state: dict,
                    keep: int) -> Path:
    """Write one checkpoint atomically, then prune to the newest `keep`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(ckpt_root)
    target = step_dir(ckpt_root, step)
    try:
        with atomic_dir(target) as tmp:
            write_adapter(tmp, target.name)  # the card is named after the final folder
            torch.save(optimizer.state_dict(), tmp / OPTIM_FILE)
            # state.json last: its presence marks the folder complete.
            (tmp / STATE_FILE).write_text(json.dumps({**state, "rng": rng_state()}, indent=1))
    except OSError as e:
        raise TrainingError(f"{target}: could not write the checkpoint ({e.strerror}); the "
                            "previous checkpoints are untouched. Free disk space, then "
                            "resume with --resume") from e
    for old in list_checkpoints(ckpt_root)[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"{ckpt / STATE_FILE}: unreadable checkpoint state ({e})") from e


def load_optimizer(ckpt: Path, optimizer) -> None:
    sd = torch.load(ckpt / OPTIM_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(sd)


def find_resume(output_dir: Path, resume: str) -> Path:
    if resume != "latest":
        p = Path(resume)
        if not (p / STATE_FILE).is_file():
            raise TrainingError(f"{p}: not a complete checkpoint (no {STATE_FILE})")
        return p
    found = list_checkpoints(output_dir / "checkpoints")
    if not found:
        raise TrainingError(f"{output_dir / 'checkpoints'}: no checkpoint to resume from")
    return found[-1]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(old: dict, new: RunConfig) -> tuple[list[str], list[str]]:
    """(changes that matter, harmless changes) between a checkpoint's recipe and `new`."""
    before = _flatten(from_dict(old).to_dict())
    after = _flatten(new.to_dict())
    matter, harmless = [], []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            line = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            (harmless if key in HARMLESS else matter).append(line)
    return matter, harmless


def resumable(cfg: RunConfig, resume: str, world: int) -> tuple[Path, dict]:
    """The checkpoint to continue and its state; refused (saying why and what to do) when this
    run cannot continue it exactly."""
    path = find_resume(Path(cfg.output.dir), resume)
    state = load_state(path)
    matter, harmless = recipe_changes(state["recipe"], cfg)
    if matter:
        raise TrainingError(f"{path}: cannot resume, the recipe changed in ways that alter the "
                            "run:\n  " + "\n  ".join(matter))
    saved_world = state.get("world_size", 1)
    if saved_world != world:
        raise TrainingError(
            f"{path}: written by a run on {saved_world} rank(s), this one has {world}: the "
            f"data shards and the global batch would differ. Resume with --nproc {saved_world} "
            f"(torchrun --nproc_per_node {saved_world})")
    for line in harmless:
        log.info("resume: allowed change %s", line)
    return path, state
