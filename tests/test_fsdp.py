"""train.parallel=fsdp: the frozen base sharded across ranks (FSDP2, gloo on CPU), same steps
and the same adapter folder as one rank with the whole batch."""

import json

import pytest
import torch
from conftest import head_recipe, recipe, toy_rows
from peft import PeftModel
from safetensors.torch import load_file
from test_distributed import _adapters, _assert_same_adapter, _losses, _recipe_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adapters.adapter import read_manifest
from adapters.config import dump_recipe
from adapters.errors import TrainingError
from adapters.model import load_tokenizer
from adapters.training import fsdp, train
from adapters.training.distributed import Dist

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")

STEPS = ["train.steps=4", "train.lr=2e-2"]


def _close_adapters(a, b, atol=1e-4):
    """Ranks sum in another order than one big batch: fp32 noise, which Adam's division by
    the gradient's size lifts to ~1e-5 on weights whose gradients are near zero."""
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def _logits(base, adapter, ids):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, adapter).eval()(ids).logits


def test_fsdp_on_one_process_equals_plain_training(tiny_gpt2, tmp_path):
    """The FSDP code path (a group of one) takes the very same steps as plain training."""
    plain = train(recipe(tiny_gpt2, tmp_path / "plain", *STEPS, rows=48))
    sharded = train(recipe(tiny_gpt2, tmp_path / "fsdp", *STEPS, "train.parallel=fsdp",
                           "train.gradient_checkpointing=true", rows=48))
    assert _losses(plain) == pytest.approx(_losses(sharded), abs=1e-5)
    _assert_same_adapter(plain, sharded)
    assert read_manifest(sharded).base.fingerprint == read_manifest(plain).base.fingerprint


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_sharded_ranks_equal_one_rank_with_twice_the_batch(arch, tiny_llama, tiny_gpt2,
                                                               tmp_path):
    """Llama's two-rank run is paused after 2 steps and resumed (same world size): a resumed
    sharded run still equals one rank with twice the batch, in one launch fewer."""
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    one = train(recipe(model, tmp_path / "one", *STEPS, "train.batch_size=4", rows=48))
    fsdp_on = ["train.parallel=fsdp", "train.gradient_checkpointing=true"]
    rec = _recipe_file(model, tmp_path / "two", *STEPS, "train.batch_size=2", *fsdp_on)
    two = tmp_path / "two" / "out"
    pause = ["--stop-after", "2"] if arch == "llama" else []
    r = _adapters("train", str(rec), "--nproc", "2", *pause)
    assert r.returncode == 0, r.stderr[-3000:]
    if pause:
        assert not (two / "adapter_model.safetensors").exists()
        with pytest.raises(TrainingError, match="2 rank.*--nproc 2"):
            train(recipe(model, tmp_path / "two", *STEPS, "train.batch_size=2", *fsdp_on,
                         rows=48), resume="latest")
        r = _adapters("train", str(rec), "--nproc", "2", "--resume")
        assert r.returncode == 0, r.stderr[-3000:]
        ckpt = load_file(sorted((two / "checkpoints").glob("step-*"))[-1]
                         / "adapter_model.safetensors")
        assert ckpt and all("lora_" in k for k in ckpt)  # only the adapter, never the base
    # (the run that finished says:) rank 1 built the base on the meta device and got its
    # shards (and LoRA) from rank 0
    assert "FSDP over 2 rank(s)" in r.stderr and "global batch 4 (2 ranks)" in r.stderr
    assert "the base read by rank 0 alone" in r.stderr
    assert len(_losses(two)) == 4 and _losses(two)[0] != _losses(two)[-1]
    assert _losses(one) == pytest.approx(_losses(two), abs=1e-4)
    _close_adapters(one, two)
    assert read_manifest(two).base.fingerprint == read_manifest(one).base.fingerprint
    summary = json.loads((two / "manifest.json").read_text())["training"]
    assert summary["global_batch"] == 4 and summary["ranks"] == 2
    # The folder is peft's: plain peft loads it and computes what the one-rank adapter does.
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    torch.testing.assert_close(_logits(model, two, ids), _logits(model, one, ids), atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_base_read_by_rank_0_alone(bits, tiny_llama, tmp_path):
    """bitsandbytes' packed weights shard like any tensor; rank 1 builds the quantized layers
    on meta from rank 0's description and receives their quantization states (CPU here)."""
    q = [f"model.quantization={bits}", "train.steps=2", "train.lr=2e-2"]
    one = train(recipe(tiny_llama, tmp_path / "one", *q, "train.batch_size=4", rows=48))
    rec = _recipe_file(tiny_llama, tmp_path / "two", *q, "train.batch_size=2",
                       "train.parallel=fsdp")
    r = _adapters("train", str(rec), "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the base read by rank 0 alone" in r.stderr
    assert "quantization states" in r.stderr
    assert _losses(one) == pytest.approx(_losses(tmp_path / "two" / "out"), abs=1e-4)
    _close_adapters(one, tmp_path / "two" / "out")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_task_head_on_two_ranks(tiny_llama, tmp_path, parallel):
    """The head (peft's modules_to_save, trained in full) is replicated like LoRA under both
    ddp and fsdp: its gradient is summed with LoRA's, and rank 0 saves it from its own copy."""
    steps = ["train.steps=4", "train.lr=1e-2", "train.schedule=constant"]
    one = train(head_recipe(tiny_llama, tmp_path / "one", *steps, "train.batch_size=4"))
    rec = tmp_path / "two" / "recipe.yaml"
    rec.parent.mkdir(parents=True)
    rec.write_text(dump_recipe(head_recipe(tiny_llama, tmp_path / "two", *steps,
                                           "train.batch_size=2", f"train.parallel={parallel}")))
    r = _adapters("train", str(rec), "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two" / "out"
    if parallel == "fsdp":
        assert "the base read by rank 0 alone" in r.stderr and "the task head" in r.stderr
    assert _losses(one) == pytest.approx(_losses(two), abs=1e-4)
    _close_adapters(one, two)
    assert "base_model.model.score.weight" in load_file(two / "adapter_model.safetensors")
    assert read_manifest(two).task == read_manifest(one).task
    # Plain transformers + peft load the folder and compute what the one-rank adapter does.
    tok = load_tokenizer(str(tiny_llama))  # its pad token is the EOS, as in training
    enc = tok([x["text"] for x in toy_rows(8, 1)], return_tensors="pt", padding=True)

    def logits(adapter):
        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_llama, num_labels=2, pad_token_id=tok.pad_token_id, dtype=torch.float32)
        with torch.no_grad():
            return PeftModel.from_pretrained(base, adapter).eval()(**enc).logits

    torch.testing.assert_close(logits(two), logits(one), atol=1e-4, rtol=0)


def test_a_lost_peer_during_a_sharded_gather_says_so(monkeypatch):
    """A dead rank breaks FSDP's all-gather inside a forward or backward hook: the job ends
    with the message ddp gives, not gloo's traceback."""
    def broken(*args, **kwargs):
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:26511")
    monkeypatch.setattr(torch.distributed, "all_gather_into_tensor", broken)
    gather = fsdp._Gather(Dist(rank=0, world=2))
    out = gather.allocate((4,), dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(TrainingError, match="lost contact with the other ranks during a "
                                            "sharded block's all-gather.*Connection closed"):
        gather(out, torch.ones(2), group=None)
