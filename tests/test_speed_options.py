"""Speed and memory options of the loop: compiled blocks, offloaded checkpointing, the
pre-flight line that names the compile choice, fused LoRA in the loop."""

import ctypes
import logging
import mmap
import os
import resource
import subprocess
import sys

import pytest
import torch
from conftest import recipe

from adapters.errors import ConfigError
from adapters.kernels.lora import is_fused
from adapters.training.compile import AUTO_MIN_STEPS, choose
from adapters.training.trainer import setup, step


def _run(model, tmp_path, *extra, steps=3):
    run = setup(recipe(model, tmp_path, f"train.steps={steps}", "train.batch_size=4", *extra))
    losses = [step(run)["loss"] for _ in range(steps)]
    params = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    return run, losses, params


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_offloaded_checkpointing_equals_plain_checkpointing(tiny_gpt2, tiny_llama, tmp_path,
                                                           model):
    path = {"gpt2": tiny_gpt2, "llama": tiny_llama}[model]
    _, plain, p_plain = _run(path, tmp_path / "a", "train.gradient_checkpointing=true")
    run, off, p_off = _run(path, tmp_path / "b", "train.offload_checkpoints=true")
    assert run.speed["offloaded_blocks"] == 2
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=1e-6)
    for n in p_plain:
        torch.testing.assert_close(p_off[n], p_plain[n], atol=1e-6, rtol=1e-6, msg=n)


def test_fused_lora_loop_equals_peft_loop(tiny_llama, tmp_path, fused_op_calls):
    # One variable changes: the attention path is checked on its own (test_attention.py), and
    # Adam turns float-rounding differences in near-zero gradients into lr-sized steps.
    run, fused, p_fused = _run(tiny_llama, tmp_path / "a", "train.attention=sdpa")
    assert run.speed["fused_lora_layers"] == 14
    assert all(is_fused(m) for n, m in run.model.named_modules() if n.endswith("q_proj"))
    # Installed does not mean used: each of the 3 steps went through the op in every layer's forward
    # and backward (2 layers x 4 calls: qkv, o, gate+up, down), none fell back to peft.
    assert fused_op_calls == {"forward": 3 * 8, "backward": 3 * 8}
    _, plain, p_plain = _run(tiny_llama, tmp_path / "b", "train.fused_lora=false",
                             "train.attention=sdpa")
    assert fused_op_calls == {"forward": 3 * 8, "backward": 3 * 8}  # the peft loop: none
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for n in p_plain:
        torch.testing.assert_close(p_fused[n], p_plain[n], atol=1e-5, rtol=1e-5, msg=n)


def test_preflight_line_names_the_compile_choice(tiny_gpt2, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="adapters"):
        setup(recipe(tiny_gpt2, tmp_path, "train.steps=2"))
    line = next(r.getMessage() for r in caplog.records if "compile" in r.getMessage())
    assert line.startswith("pre-flight: compile off (auto: off on CPU"), line


def test_compile_choice_rules():
    assert choose(True, "cpu", 1) == (True, "train.compile=true")
    assert choose("false", "cuda:0", 10_000)[0] is False
    assert choose("auto", "cuda:0", AUTO_MIN_STEPS)[0] is True
    on, why = choose("auto", "cuda:0", AUTO_MIN_STEPS - 1)
    assert not on and f"{AUTO_MIN_STEPS - 1} steps is too short" in why
    with pytest.raises(ConfigError, match="train.compile: 'yes' is not one of auto, true, false"):
        choose("yes", "cpu", 1)
    on, why = choose("auto", "cuda:0", 10_000, "train.parallel=fsdp")
    assert not on and "off with train.parallel=fsdp" in why
    assert choose(True, "cuda:0", 1, "a 4-bit base")[0] is True  # forcing it still works


def test_compiled_blocks_match_eager_losses(tiny_llama, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # restored to absent afterwards
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    # Tiny Llama, 5 steps: one block graph compiled and reused by both layers.
    with caplog.at_level(logging.INFO, logger="adapters"):
        run, compiled, _ = _run(tiny_llama, tmp_path / "a", "train.compile=true",
                                "model.dtype=bf16", steps=5)
    assert run.speed["compiled_blocks"] == 2
    assert any("pre-flight: compile on (train.compile=true)" in r.getMessage()
               for r in caplog.records)
    _, eager, _ = _run(tiny_llama, tmp_path / "b", "model.dtype=bf16", steps=5)
    torch.testing.assert_close(compiled, eager, atol=0.0, rtol=2e-2)  # bf16 rounding
    cache = tmp_path / "home" / "compile-cache"
    assert cache.is_dir() and any(cache.rglob("*")), "no persistent compile cache written"


_FAULTS = """
import ctypes, resource, sys
from adapters.training.runtime import give_back_host_memory, keep_freed_host_memory
made = keep_freed_host_memory() if sys.argv[1] != "default" else None
if sys.argv[1] == "undone":  # what train() does when it ends
    give_back_host_memory(made)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 24 << 20

def round_trip():  # a step's worth of one activation: allocate, touch every page, free
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)

round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(made, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _minor_faults_touching_fresh_pages(size: int) -> int:
    """ru_minflt's rise in this process while every page of a fresh anonymous map is written."""
    with mmap.mmap(-1, size) as m:
        buf = (ctypes.c_char * size).from_buffer(m)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(buf, 1, size)
        counted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        del buf  # the map cannot close while a view of it is exported
    return counted


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_host_memory_is_reused_without_page_faults():
    """The loop's allocator setting: the second 24 MiB block of a process faults no pages in
    (glibc's default gives the first one back to the OS and faults ~6000 pages again); once
    training ends the setting is undone."""
    pages = (24 << 20) // mmap.PAGESIZE
    # What this measures is the OS's count of minor faults, one per fresh page. Where it counts
    # none (some sandboxes) or one per huge page (transparent huge pages on "always"), "no
    # faults" cannot be told from "not counted": skip, naming what was seen.
    counted = _minor_faults_touching_fresh_pages(24 << 20)
    if counted < pages // 2:
        pytest.skip(f"ru_minflt rose by {counted} while {pages} fresh pages were written: this "
                    "OS does not count one minor fault per page")
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}

    def start(mode, **extra):  # each its own process (a fresh heap); all four at once
        return subprocess.Popen([sys.executable, "-c", _FAULTS, mode], env={**env, **extra},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def faults(proc):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        made, count = out.split()
        return made, int(count)

    default, tuned, undone = start("default"), start("tuned"), start("undone")
    # a user's own malloc settings win: nothing is changed, the faults come back
    theirs = start("tuned", GLIBC_TUNABLES="glibc.malloc.check=0")
    assert faults(default)[1] > pages // 2
    made, count = faults(tuned)
    assert made == "True" and count < pages // 20
    made, count = faults(undone)  # after training: glibc's own behaviour again
    assert made == "True" and count > pages // 2
    made, count = faults(theirs)
    assert made == "False" and count > pages // 2
