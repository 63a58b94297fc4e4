"""Data parallel under torchrun on CPU (gloo, two processes): same steps as one big batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import recipe
from safetensors.torch import load_file

from adapters.config import dump_recipe
from adapters.errors import TrainingError
from adapters.training import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")



def _env():
    # one thread per rank: two ranks share this machine's two cores; CPU and gloo even where
    # a GPU is present (one GPU cannot hold two ranks)
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _recipe_file(model, folder: Path, *extra) -> Path:
    cfg = recipe(model, folder, *extra, rows=48)
    path = folder / "recipe.yaml"
    path.write_text(dump_recipe(cfg))
    return path


def _adapters(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "adapters", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


def _assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)


def test_two_ranks_equal_one_rank_with_twice_the_batch_and_resume(tiny_llama, tmp_path):
    """Two ranks, paused after 2 steps and resumed, take the steps of one rank with twice the
    batch run straight through: both promises in two launches (each costs ~17 s here)."""
    steps = ["train.steps=4", "train.lr=2e-2"]
    one = train(recipe(tiny_llama, tmp_path / "one", *steps, "train.batch_size=4", rows=48))
    two_recipe = _recipe_file(tiny_llama, tmp_path / "two", *steps, "train.batch_size=2")
    two = tmp_path / "two" / "out"
    r = _adapters("train", str(two_recipe), "--nproc", "2", "--stop-after", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (two / "adapter_model.safetensors").exists()  # paused: checkpoints only
    with pytest.raises(TrainingError, match="2 rank.*--nproc 2"):  # one rank is refused
        train(recipe(tiny_llama, tmp_path / "two", *steps, "train.batch_size=2", rows=48),
              resume="latest")
    r = _adapters("train", str(two_recipe), "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 4 (2 ranks)" in r.stderr
    assert _losses(one) == pytest.approx(_losses(two), abs=1e-5)
    assert len(_losses(two)) == 4 and _losses(two)[0] != _losses(two)[-1]
    _assert_same_adapter(one, two)
    summary = json.loads((two / "manifest.json").read_text())["training"]
    assert summary["global_batch"] == 4 and summary["ranks"] == 2


def test_4bit_base_on_two_ranks(tiny_llama, tmp_path):
    rec = _recipe_file(tiny_llama, tmp_path, "train.steps=2", "model.quantization=4bit")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "adapters", "train", str(rec)],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _adapters("verify", str(tmp_path / "out"), "--base", str(tiny_llama),
                     "--quantization", "4bit").returncode == 0


def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (children of `parent`)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if ppid == parent and rank:
            found[int(rank[0][5:])] = int(proc.name)
    return found


def test_a_killed_rank_ends_the_job_with_a_clear_error(tiny_llama, tmp_path):
    rec = _recipe_file(tiny_llama, tmp_path, "train.steps=100000", "train.save_every=2")
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "-m", "adapters", "train", str(rec)],
                           env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = tmp_path / "out" / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
            time.sleep(0.5)
        workers = _workers(job.pid)
        assert set(workers) == {0, 1}
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        output, _ = job.communicate(timeout=120)
        ended = time.monotonic() - t0
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0 and ended < 60
    assert "lost contact with the other ranks" in output or "Signal 9" in output, output[-3000:]
    assert "rank" in output and ("SIGKILL" in output or "Signal 9" in output), output[-3000:]
    ckpts = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "adapter_model.safetensors").is_file()  # last good one
