"""Merge and combine: merged == base + adapter, streaming == in-memory, checks that bite."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_gpt2, make_llama, trained_adapter
from safetensors.torch import load_file, save_file

from adapters.adapter import load_adapter
from adapters.combine import combine
from adapters.config import ModelConfig
from adapters.errors import AdaptersError
from adapters.merge import MergeError, merge_adapter, merge_streaming
from adapters.model import exact_4bit_on_cpu, load_base


@pytest.fixture
def ids(tiny_tok):
    return tiny_tok("for i in range(10):\n    print(i * i)", return_tensors="pt")["input_ids"]


def _reference_logits(model_path, adapter, ids, **kw):
    base, tok = load_base(ModelConfig(name=str(model_path), **{"dtype": "fp32", **kw}))
    exact_4bit_on_cpu(base)  # the fp32 dequantize-then-matmul path that training uses
    with torch.no_grad():
        model = load_adapter(base, adapter, tokenizer=tok).eval()
        return _logits(model, ids)


def _logits(model, ids):
    """load_base places the model on CUDA when there is one; compare on the CPU."""
    return model(ids.to(model.device)).logits.float().cpu()


def _merged_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m, m(ids).logits


def test_merged_equals_base_plus_adapter(tiny_model, tmp_path, ids):
    trained_adapter(tiny_model, tmp_path / "a")
    out, v = merge_adapter(tmp_path / "a", tmp_path / "merged")
    model, got = _merged_logits(out, ids)
    torch.testing.assert_close(got, _reference_logits(tiny_model, tmp_path / "a", ids),
                               atol=1e-4, rtol=0)
    assert v.max_logit_diff < 1e-4 and v.mean_kl < 1e-6
    assert v.ppl_reference == pytest.approx(v.ppl_merged, rel=1e-4)
    assert not any("lora" in k for k in model.state_dict())  # plain transformers, no peft
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    assert (out / "tokenizer_config.json").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_4bit_trained_adapter_against_dequantized_and_original(arch, tiny_gpt2, tiny_llama,
                                                               tmp_path, ids):
    path = {"gpt2": tiny_gpt2, "llama": tiny_llama}[arch]
    trained_adapter(path, tmp_path / "a", quantization="4bit")
    ref = _reference_logits(path, tmp_path / "a", ids, quantization="4bit")
    out, deq = merge_adapter(tmp_path / "a", tmp_path / "deq", against="dequantized")
    _, got = _merged_logits(out, ids)
    # The merged weights are exactly the dequantized nf4 weights + B A: only float noise.
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    _, orig = merge_adapter(tmp_path / "a", tmp_path / "orig", against="original", max_kl=10)
    assert orig.mean_kl > 100 * max(deq.mean_kl, 1e-9)  # original weights: another model
    with pytest.raises(MergeError, match="most different: hidden state"):
        merge_adapter(tmp_path / "a", tmp_path / "strict", against="original", max_kl=1e-6)
    assert not (tmp_path / "strict").exists()


def test_corrupted_adapter_fails_verification_and_writes_nothing(tiny_llama, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "a")
    w = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(w)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, w)
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(
        {k: v for k, v in json.loads((tmp_path / "a" / "manifest.json").read_text()).items()
         if k != "weights"}))
    with pytest.raises(MergeError, match="Nothing was written"):
        merge_adapter(tmp_path / "a", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_streaming_merge_equals_in_memory_bit_for_bit(arch, tiny_tok, tmp_path):
    maker = make_gpt2 if arch == "gpt2" else make_llama
    base = maker(tmp_path / "base", tiny_tok)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base)
    m.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # several shards
    tiny_tok.save_pretrained(tmp_path / "sharded")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2
    trained_adapter(tmp_path / "sharded", tmp_path / "a")
    merge_streaming(tmp_path / "sharded", tmp_path / "a", tmp_path / "streamed")
    merge_adapter(tmp_path / "a", tmp_path / "memory", verify=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict()
    assert a.keys() == b.keys()
    changed = 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
        changed += not torch.equal(a[k], m.state_dict()[k])
    assert changed >= 2 * 4  # every adapted matrix of both layers moved


def test_cli_merge_stream_and_combine(tiny_gpt2, tmp_path):
    trained_adapter(tiny_gpt2, tmp_path / "a", seed=1)
    trained_adapter(tiny_gpt2, tmp_path / "b", seed=2)
    run = lambda *a: subprocess.run([sys.executable, "-m", "adapters", *map(str, a)],  # noqa
                                    capture_output=True, text=True, timeout=300)
    res = run("merge", tmp_path / "a", "--out", tmp_path / "m", "--stream")
    assert res.returncode == 0, res.stderr
    assert "verified: max logit difference" in res.stdout
    res = run("combine", tmp_path / "a", tmp_path / "b", "--weights", "0.7", "0.3",
              "--method", "cat", "--out", tmp_path / "c")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("method", ["linear", "cat", "ties"])
def test_combined_adapter_loads_in_plain_peft(tiny_llama, tmp_path, ids, method):
    from peft import PeftModel

    trained_adapter(tiny_llama, tmp_path / "a", seed=1)
    trained_adapter(tiny_llama, tmp_path / "b", seed=2)
    out = combine([tmp_path / "a", tmp_path / "b"], [0.7, 0.3], tmp_path / "c", method=method)
    man = json.loads((out / "manifest.json").read_text())
    assert man["combined_from"]["weights"] == [0.7, 0.3]
    assert man["combined_from"]["method"] == method
    base, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    with torch.no_grad():
        plain = _logits(PeftModel.from_pretrained(base, out).eval(), ids)
    assert torch.isfinite(plain).all()
    if method == "cat":  # cat is exact: the sum of both weighted deltas
        expected = _reference_logits(tiny_llama, tmp_path / "a", ids)
        assert not torch.allclose(plain, expected)


def test_combine_refuses_other_bases(tiny_llama, tiny_tok, tmp_path):
    other = make_llama(tmp_path / "other", tiny_tok, seed=9)
    trained_adapter(tiny_llama, tmp_path / "a")
    trained_adapter(other, tmp_path / "b")
    with pytest.raises(AdaptersError, match="another base"):
        combine([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "c")
