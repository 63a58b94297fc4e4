"""Training that survives: exact resume, kill -9 mid-write, SIGINT, NaN guard, refusals."""

import json
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import qa_csv, recipe
from parked import start_parked
from safetensors.torch import load_file

import adapters.training.heads as heads
import adapters.training.runtime as rt
import adapters.training.trainer as train_mod
from adapters.errors import TrainingError
from adapters.training import train
from adapters.training.checkpoint import STATE_FILE, list_checkpoints, load_state


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


def test_checkpoint_without_schedule_state_resumes_exactly(tiny_gpt2, tmp_path):
    """Checkpoints of older versions still resume: the schedule (not saved then) is replayed to
    the checkpoint's step (warmup + cosine: the lr matters), and recipe keys that came later
    or only set speed options are no change that matters."""
    common = ["train.steps=6", "train.warmup_steps=2", "train.schedule=cosine"]
    full = train(recipe(tiny_gpt2, tmp_path / "a", *common))
    cfg = recipe(tiny_gpt2, tmp_path / "b", *common)
    train(cfg, stop_after=3)
    state_file = list_checkpoints(tmp_path / "b" / "out" / "checkpoints")[-1] / STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["scheduler"]["last_epoch"] == 3  # what a resume of a new checkpoint loads back
    del state["scheduler"]
    # ... and as an older version wrote its recipe: compile off, no newer keys
    state["recipe"]["train"]["compile"] = False
    for key in ("fused_lora", "offload_checkpoints", "parallel", "report_to", "objective",
                "dpo_beta", "dpo_loss", "orpo_lambda"):
        state["recipe"]["train"].pop(key, None)
    state_file.write_text(json.dumps(state))
    resumed = train(cfg, resume="latest")
    lrs = [json.loads(x)["lr"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    full_lrs = [json.loads(x)["lr"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert lrs == full_lrs and len(set(lrs)) > 2
    a, b = weights(full), weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_unresumable_checkpoint_is_refused_before_the_model_loads(tiny_gpt2, tmp_path,
                                                                  monkeypatch):
    cfg = recipe(tiny_gpt2, tmp_path, "train.steps=4")
    train(cfg, stop_after=2)
    changed = recipe(tiny_gpt2, tmp_path, "train.steps=4", "lora.r=8")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the checkpoint was checked")

    monkeypatch.setattr(train_mod, "setup", no_load)
    with pytest.raises(TrainingError, match="lora.r: 4 -> 8"):
        train(changed, resume="latest")
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        train(cfg, resume=str(tmp_path / "nowhere"))


def test_fresh_start_over_an_old_run_is_refused(tiny_gpt2, tmp_path):
    cfg = recipe(tiny_gpt2, tmp_path, "train.steps=2")
    train(cfg)
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg)


def test_nan_steps_are_skipped_counted_then_stop(tiny_gpt2, tmp_path, monkeypatch, caplog):
    real = heads.batch_loss  # the step's loss of one micro-batch (sft: per token)
    calls = {"n": 0}
    bad = {3}  # a single bad micro-batch: skipped, training goes on

    def flaky(model, batch):
        calls["n"] += 1
        s = real(model, batch)
        return s * float("nan") if calls["n"] in bad else s

    monkeypatch.setattr(heads, "batch_loss", flaky)
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


def test_ranks_probing_one_fresh_output_folder_at_once_never_fail(tmp_path):
    """Under torchrun every rank checks the same new folder at the same moment; a probe file
    shared by name let one rank's unlink race another's write ("not writable" on rank 1)."""
    out = tmp_path / "fresh" / "out"
    n = 8
    start = threading.Barrier(n, timeout=60)

    def rank(_):
        start.wait()  # all probes start together
        for _ in range(200):
            rt.check_output_dir(out)

    with ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(rank, i) for i in range(n)]:
            f.result(timeout=120)
    assert list(out.iterdir()) == []  # no probe left behind


def test_unwritable_output_and_full_disk(tiny_gpt2, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = recipe(tiny_gpt2, tmp_path, "train.steps=2", f"output.dir={blocker / 'out'}")
    with pytest.raises(TrainingError, match="output folder is not writable"):
        train(cfg)
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


def test_kill_9_during_checkpoint_write_leaves_previous_loadable(tiny_gpt2, tmp_path):
    r = _recipe_file(tiny_gpt2, tmp_path, steps=10)
    root = tmp_path / "out" / "checkpoints"
    proc = start_parked("checkpoint-write", 2, r, tmp_path / "stderr.txt")
    proc.kill()  # SIGKILL in the middle of writing step-000002
    proc.wait(timeout=60)
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-step-000002-")]
    last = list_checkpoints(root)[-1]
    assert last.name == "step-000001"
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
    log = tmp_path / "stderr.txt"
    proc = start_parked("after-step", 3, r, log)
    proc.send_signal(signal.SIGINT)  # caught while parked: the run stops after this step
    proc.stdin.close()  # let it go on
    assert proc.wait(timeout=120) == 128 + signal.SIGINT, log.read_text()[-2000:]
    assert "--resume" in log.read_text()
    assert load_state(list_checkpoints(tmp_path / "out" / "checkpoints")[-1])["step"] == 3
    res = subprocess.run([sys.executable, "-m", "adapters", "train", str(r), "--resume",
                          "train.steps=6"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(losses(tmp_path / "out")) == 6
