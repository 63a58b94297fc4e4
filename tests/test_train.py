"""The training loop on tiny models: what changes, what doesn't, and the output folder."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import qa_csv, recipe
from safetensors.torch import load_file

from adapters.training.runtime import StopSignals
from adapters.training.trainer import Outcome, fit, setup, step, train


def test_steps_change_every_trainable_and_no_frozen_parameter(tiny_model, tmp_path):
    run = setup(recipe(tiny_model, tmp_path, "train.steps=3"))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    for _ in range(3):
        step(run)
    assert run.step == 3  # step() alone advances the counter
    for n, p in run.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.mark.parametrize("extra", [[], ["model.quantization=4bit"], ["data.packing=false"],
                                   ["train.grad_accum=2", "train.gradient_checkpointing=true"]],
                         ids=["fp32", "qlora", "padded", "accum+ckpt"])
def test_thirty_steps_lower_the_loss(tiny_llama, tmp_path, extra):
    # Four rows to learn by heart: a tiny random model can only memorise.
    out = train(recipe(tiny_llama, tmp_path, "train.steps=30", "train.lr=2e-2", *extra, rows=4))
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_grad_accum_equals_bigger_batch(tiny_gpt2, tmp_path):
    """Token-weighted accumulation: 2 x batch 2 is the same step as 1 x batch 4."""
    a = setup(recipe(tiny_gpt2, tmp_path, "train.steps=1", "train.batch_size=4",
                     "data.packing=false"))
    b = setup(recipe(tiny_gpt2, tmp_path, "train.steps=1", "train.batch_size=2",
                     "train.grad_accum=2", "data.packing=false"))
    b.batcher.batch = lambda epoch, i: _half(a, i)  # same examples, split in two
    ma, mb = step(a), step(b)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def _half(run, i):
    full = run.batcher.batch(0, 0)
    return {k: v[2 * i: 2 * i + 2] if v.ndim else v for k, v in full.items()}


def test_cli_train_writes_the_full_output_folder(tiny_gpt2, tmp_path):
    data = qa_csv(tmp_path / "qa.csv")
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {{name: {tiny_gpt2}, dtype: fp32}}\nlora: {{r: 4}}\n"
                 f"data: {{train: {data}, eval_fraction: 0.25, max_seq_len: 64}}\n"
                 "train: {steps: 6, batch_size: 2, eval_every: 3, save_every: 3}\n"
                 f"output: {{dir: {tmp_path / 'out'}}}\n")
    res = subprocess.run([sys.executable, "-m", "adapters", "train", str(r), "train.lr=1e-3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json",
            "recipe.resolved.yaml", "metrics.jsonl", "loss.png", "checkpoints"} <= names
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003",
                                                                      "step-000006"]
    # Each card is titled after its own folder, not the temporary one it was written in.
    card = (out / "checkpoints" / "step-000003" / "README.md").read_text()
    assert "\n# step-000003\n" in card and ".tmp-" not in card
    summary = json.loads((out / "manifest.json").read_text())["training"]
    assert summary["steps"] == 6 and summary["tokens"] > 0 and summary["final_eval_loss"]
    assert "lr: 0.001" in (out / "recipe.resolved.yaml").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "trainable_tokens", "tokens_per_s",
            "peak_memory_bytes"} <= set(rows[0])
    assert any("eval_loss" in r for r in rows)
    assert "pre-flight" in res.stderr and "done:" in res.stderr
    # The final adapter equals the last checkpoint's.
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(out / "checkpoints" / "step-000006" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [["model.dtype=fp16"], ["train.optimizer=adamw_8bit"]],
                         ids=["fp16+grad-scaler", "adamw-8bit"])
def test_fp16_scaler_and_8bit_adam_train(tiny_llama, tmp_path, extra):
    cfg = recipe(tiny_llama, tmp_path, "train.steps=12", "train.lr=2e-2", "train.save_every=6",
                 *extra, rows=4)
    out = train(cfg)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert sum(losses[-3:]) < sum(losses[:3])
    state = json.loads((out / "checkpoints" / "step-000012" / "state.json").read_text())
    assert (state["scaler"] is not None) == ("model.dtype=fp16" in extra)


def test_fit_says_whether_it_paused_or_finished(tiny_gpt2, tmp_path):
    run = setup(recipe(tiny_gpt2, tmp_path, "train.steps=3"))
    assert fit(run, StopSignals(), stop_after=2) is Outcome.PAUSED and run.step == 2
    assert not (run.out / "adapter_model.safetensors").exists()
    assert fit(run, StopSignals()) is Outcome.FINISHED and run.step == 3
    assert (run.out / "adapter_model.safetensors").is_file()
