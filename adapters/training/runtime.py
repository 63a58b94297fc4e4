"""Process-level concerns of a run: seeds, stop signals, memory figures, output folder checks,
the host allocator."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainingError
from .checkpoint import list_checkpoints

log = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 32 << 20  # glibc's largest mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit)
_TRIM_BYTES = 1 << 30
_DEFAULT_BYTES = 128 << 10  # glibc's starting value of both thresholds


def keep_freed_host_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse instead of handing them back to the OS.

    A training step allocates and frees the same tens of MB of activations every step. By
    default glibc serves big blocks with mmap and gives them back on free (and trims the top of
    its heap), so next step's tensors fault their pages in afresh: blocks up to 32 MiB are
    kept in the heap and the top is trimmed only past 1 GiB (what it is worth: the
    `--same-allocator` row of scripts/bench_train.py). Made once the model is loaded (its loading
    temporaries keep glibc's default path), and `give_back_host_memory` trims the heap when
    training ends. Linux with glibc only, and not when the user tuned malloc already
    (GLIBC_TUNABLES, MALLOC_*_ variables, a preloaded allocator). Returns whether it was made.
    """
    if not sys.platform.startswith("linux") or "malloc" in os.environ.get("LD_PRELOAD", "") \
            or any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: leave it alone
        return False
    made = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD,
                                                                     _TRIM_BYTES))
    log.debug("host allocator: freed blocks kept for reuse: %s", made)
    return made


def give_back_host_memory(kept: bool) -> None:
    """Once training is over: the heap's free memory handed back to the OS (malloc_trim) and,
    if `keep_freed_host_memory` made its setting (`kept`), glibc's thresholds back to their
    starting values, so a long-lived process (a notebook) keeps neither a run's activations
    nor the setting."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        if kept:
            libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_BYTES)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_BYTES)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_bytes(device: str = "cpu") -> int:
    """Peak RSS of this process on CPU, or CUDA's peak allocation on a GPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)


def _meminfo(*keys: str) -> int:
    """The sum of /proc/meminfo's `keys`, in bytes (0 where there is no /proc)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(ln.split()[1]) * 1024 for ln in lines if ln.split(":")[0] in keys)


def free_memory_bytes() -> int:
    return _meminfo("MemAvailable")


def total_memory_bytes() -> int:
    """RAM and swap together: a run whose estimate passes this cannot fit whatever else ends."""
    return _meminfo("MemTotal", "SwapTotal")


def estimate_memory(model, batch: int, seq: int, vocab: int) -> dict[str, int]:
    """Rough peak: weights + LoRA optimiser state + activations + one logits chunk."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    # ~34 saved activations of size hidden per token per layer in a transformer block (fp32
    # upper bound) is the usual estimate; attention scores add heads * seq per token.
    activations = batch * seq * layers * hidden * 34 * 2
    optimizer = trainable * 4 * 3  # fp32 grads + two Adam moments
    logits = 1024 * max(vocab, 1) * 4 * 2
    total = weights + optimizer + activations + logits
    return {"total": int(total), "weights": weights, "free": free_memory_bytes(),
            "machine": total_memory_bytes()}


def check_output_dir(out: Path) -> None:
    """Fail before training when the output folder can't be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A probe of its own per caller: under torchrun every rank checks the same fresh folder
        # at once, and a shared name let one rank's unlink race another's write.
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise TrainingError(f"{out}: output folder is not writable ({e.strerror}); choose "
                            "another output.dir") from e


def prepare_output(out: Path, fresh: bool, main: bool) -> None:
    """Check the folder is writable; a fresh run refuses one that holds an earlier run."""
    check_output_dir(out)
    if not fresh:
        return
    earlier = list_checkpoints(out / "checkpoints")
    if earlier:
        raise TrainingError(f"{out}: holds checkpoints of an earlier run (newest "
                            f"{earlier[-1].name}); continue it with --resume, or choose "
                            "another output.dir")
    if main:
        (out / "metrics.jsonl").unlink(missing_ok=True)


def check_disk(out: Path, need_bytes: int) -> None:
    """Fail before training when the disk cannot hold the checkpoints this run will keep."""
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise TrainingError(f"{out}: only {free >> 20} MiB free on this disk, checkpoints need "
                            f"about {need_bytes >> 20} MiB; free some space or move output.dir")


class Interrupted(TrainingError):
    """Stopped by SIGINT/SIGTERM after writing a checkpoint; resume with --resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """First SIGINT/SIGTERM: ask the loop to stop after this step. Second: exit at once."""

    def __init__(self):
        self.requested: int | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            os._exit(128 + signum)
        self.requested = signum
        log.warning("stopping after this step (%s); send it again to exit at once",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
