"""Training that survives: exact resume, kill -9 mid-write, SIGINT, NaN guard, refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import qa_csv, recipe
from safetensors.torch import load_file

import adapters.train.trainer as train_mod
from adapters.errors import TrainingError
from adapters.train import train
from adapters.train.checkpoint import list_checkpoints, load_state


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


def weights(out):
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("packing", ["true", "false"])
def test_half_plus_resume_equals_uninterrupted(tiny_llama, tmp_path, packing):
    common = ["train.steps=10", "train.save_every=3", f"data.packing={packing}",
              "lora.dropout=0.1", "train.warmup_steps=2"]  # dropout: RNG state must resume too
    full = train(recipe(tiny_llama, tmp_path / "a", *common, rows=30))
    cfg = recipe(tiny_llama, tmp_path / "b", *common, rows=30)
    train(cfg, stop_after=5)  # stops mid-epoch: 30 rows / batch 2 > 5 steps
    assert not (tmp_path / "b" / "out" / "adapter_model.safetensors").exists()
    state = load_state(list_checkpoints(tmp_path / "b" / "out" / "checkpoints")[-1])
    assert state["step"] == 5
    resumed = train(cfg, resume="latest")
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(full)),
                               rtol=1e-5, atol=0)
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_changed_recipe_is_refused_with_a_diff(tiny_gpt2, tmp_path):
    cfg = recipe(tiny_gpt2, tmp_path, "train.steps=4", "train.save_every=2")
    train(cfg, stop_after=2)
    changed = recipe(tiny_gpt2, tmp_path, "train.steps=4", "lora.r=8", "train.batch_size=3")
    with pytest.raises(TrainingError) as e:
        train(changed, resume="latest")
    assert "lora.r: 4 -> 8" in str(e.value) and "train.batch_size: 2 -> 3" in str(e.value)
    longer = recipe(tiny_gpt2, tmp_path, "train.steps=6", "train.save_every=2")
    out = train(longer, resume="latest")  # more steps: a harmless change
    assert len(losses(out)) == 6


def test_fresh_start_over_an_old_run_is_refused(tiny_gpt2, tmp_path):
    cfg = recipe(tiny_gpt2, tmp_path, "train.steps=2")
    train(cfg)
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg)


def test_nan_steps_are_skipped_counted_then_stop(tiny_gpt2, tmp_path, monkeypatch, caplog):
    real = train_mod.batch_loss
    calls = {"n": 0}
    bad = {3}  # a single bad micro-batch: skipped, training goes on

    def flaky(model, batch, chunk=1024):
        calls["n"] += 1
        s, n = real(model, batch, chunk)
        return (s * float("nan"), n) if calls["n"] in bad else (s, n)

    monkeypatch.setattr(train_mod, "batch_loss", flaky)
    out = train(recipe(tiny_gpt2, tmp_path / "a", "train.steps=6"))
    summary = json.loads((out / "manifest.json").read_text())["training"]
    assert summary["bad_steps"] == 1 and "non-finite" in caplog.text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["finite"] for r in rows if "finite" in r].count(False) == 1
    assert all(torch.isfinite(t).all() for t in weights(out).values())

    calls["n"] = 0
    bad.update(range(5, 100))  # from step 5 on, every step is bad
    with pytest.raises(TrainingError, match=r"step 6: 2 non-finite steps in a row"):
        train(recipe(tiny_gpt2, tmp_path / "b", "train.steps=10", "train.save_every=2",
                     "train.max_bad_steps=2"))
    ckpts = list_checkpoints(tmp_path / "b" / "out" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000002", "step-000004"]  # step 5 and 6 not saved
    assert all(torch.isfinite(t).all()
               for t in load_file(ckpts[-1] / "adapter_model.safetensors").values())


def test_unwritable_output_and_full_disk(tiny_gpt2, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = recipe(tiny_gpt2, tmp_path, "train.steps=2", f"output.dir={blocker / 'out'}")
    with pytest.raises(TrainingError, match="output folder is not writable"):
        train(cfg)
    import adapters.train.runtime as rt

    monkeypatch.setattr(rt.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(TrainingError, match="only 0 MiB free"):
        train(recipe(tiny_gpt2, tmp_path, "train.steps=2"))


def _recipe_file(model, tmp_path, steps, save_every=1):
    data = qa_csv(tmp_path / "qa.csv", 40)
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {{name: {model}, dtype: fp32}}\nlora: {{r: 4}}\n"
                 f"data: {{train: {data}, max_seq_len: 64}}\n"
                 f"train: {{steps: {steps}, batch_size: 2, save_every: {save_every}, "
                 "keep_checkpoints: 3}\n"
                 f"output: {{dir: {tmp_path / 'out'}}}\n")
    return r


def _start(recipe_path, *extra):
    return subprocess.Popen([sys.executable, "-m", "adapters", "train", str(recipe_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc, timeout=120):
    t = time.time()
    while not cond():
        if proc.poll() is not None or time.time() - t > timeout:
            proc.kill()
            raise AssertionError(f"condition not met; exit {proc.poll()}: "
                                 f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.0005)


def test_kill_9_during_checkpoint_write_leaves_previous_loadable(tiny_gpt2, tmp_path):
    r = _recipe_file(tiny_gpt2, tmp_path, steps=2000)
    root = tmp_path / "out" / "checkpoints"
    proc = _start(r)

    def writing():  # a checkpoint folder is being written, and an older one is complete
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return False
        return any(n.startswith(".tmp-step-") for n in names) and any(
            n.startswith("step-") for n in names)

    _wait_for(writing, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # killed mid-write
    last = list_checkpoints(root)[-1]
    state = load_state(last)
    assert load_file(last / "adapter_model.safetensors")
    torch.load(last / "optimizer.pt", weights_only=True)
    res = subprocess.run([sys.executable, "-m", "adapters", "train", str(r), "--resume",
                          "train.steps=" + str(state["step"] + 2)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # stale tmp cleaned
    assert list_checkpoints(root)[-1].name == f"step-{state['step'] + 2:06d}"


def test_sigint_checkpoints_then_resume_finishes(tiny_gpt2, tmp_path):
    r = _recipe_file(tiny_gpt2, tmp_path, steps=400, save_every=1000)
    metrics = tmp_path / "out" / "metrics.jsonl"
    proc = _start(r)
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    assert "--resume" in err
    done = load_state(list_checkpoints(tmp_path / "out" / "checkpoints")[-1])["step"]
    assert 3 <= done < 400
    res = subprocess.run([sys.executable, "-m", "adapters", "train", str(r), "--resume",
                          f"train.steps={done + 3}"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(losses(tmp_path / "out")) == done + 3
