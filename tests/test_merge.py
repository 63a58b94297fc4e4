"""Merge and combine: merged == base + adapter, streaming == in-memory, checks that bite."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import make_gpt2, make_llama, trained_adapter
from peft import PeftModel
from safetensors.torch import load_file, save_file

from adapters.adapter import load_adapter
from adapters.adapter.archive import pack
from adapters.combine import combine
from adapters.config import ModelConfig
from adapters.errors import AdapterFileError, AdaptersError
from adapters.merge import (
    MergeError,
    merge_adapter,
    merge_streaming,
    merge_streaming_verified,
    read_base_name,
)
from adapters.model import exact_4bit_on_cpu, load_base

MERGES = {"memory": merge_adapter, "stream": merge_streaming_verified}


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



def test_streamed_merge_of_a_4bit_adapter_checks_its_own_arithmetic(tiny_llama, tmp_path, ids):
    """Streaming writes the original weights + delta: it is checked against the full-precision
    base + adapter (the in-memory merge's "original" option differs from training by nf4)."""
    trained_adapter(tiny_llama, tmp_path / "a", quantization="4bit")
    out, v = merge_streaming_verified(tmp_path / "a", tmp_path / "s")  # default max_kl 0.05
    assert v.mean_kl < 1e-6
    _, got = _merged_logits(out, ids)
    torch.testing.assert_close(got, _reference_logits(tiny_llama, tmp_path / "a", ids),
                               atol=1e-4, rtol=0)

@pytest.mark.parametrize("path", MERGES)
def test_corrupted_adapter_fails_verification_and_writes_nothing(path, tiny_llama, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "a")
    w = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(w)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, w)
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(
        {k: v for k, v in json.loads((tmp_path / "a" / "manifest.json").read_text()).items()
         if k != "weights"}))
    # refused when read (a NaN fails every answer), before any merge: nothing is written
    with pytest.raises(AdapterFileError, match=f"{key}: holds NaN or inf"):
        MERGES[path](tmp_path / "a", tmp_path / "merged")
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


def _pairs(folder):
    """{module: (A, B)} of a saved adapter and its scaling (lora_alpha / r)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    w = load_file(folder / "adapter_model.safetensors")
    pairs = {k[:-len(".lora_A.weight")]: (w[k], w[k.replace(".lora_A.", ".lora_B.")])
             for k in w if k.endswith(".lora_A.weight")}
    return pairs, cfg["lora_alpha"] / cfg["r"]


def _ties(tensors, weights, density):
    """TIES-merging as peft's add_weighted_adapter applies it to the As and to the Bs: keep
    each tensor's top `density` share by magnitude, elect each entry's sign by the sum of the
    kept values, then average the weighted values that agree with it."""
    kept = []
    for t in tensors:
        mask = torch.zeros(t.numel(), dtype=torch.bool)
        mask[t.abs().flatten().topk(int(density * t.numel())).indices] = True
        kept.append(t * mask.view(t.shape))
    kept = torch.stack(kept)  # (n, *shape)
    elected = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = kept.sign() == elected
    weighted = kept * torch.tensor(weights).view(-1, *[1] * (kept.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1), elected


@pytest.fixture
def two_adapters(tiny_llama, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "a", seed=1)
    trained_adapter(tiny_llama, tmp_path / "b", seed=2)
    return tmp_path / "a", tmp_path / "b"


def test_combine_cat_is_exactly_the_weighted_sum_of_deltas(two_adapters, tiny_llama, tmp_path,
                                                           ids):
    (a, sa), (b, sb) = _pairs(two_adapters[0]), _pairs(two_adapters[1])
    out = combine(list(two_adapters), [0.7, 0.3], tmp_path / "c", method="cat")
    c, sc = _pairs(out)
    assert c.keys() == a.keys() == b.keys() and len(c) == 2 * 7  # every projection, 2 layers
    base, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    params = dict(base.named_parameters())
    for m, (ac, bc) in c.items():
        (a1, b1), (a2, b2) = a[m], b[m]
        # peft's cat: A rows scaled by weight * scaling, B columns as they are.
        assert torch.equal(ac, torch.cat([a1 * 0.7 * sa, a2 * 0.3 * sb]))
        assert torch.equal(bc, torch.cat([b1, b2], dim=1))
        expected = 0.7 * sa * (b1 @ a1) + 0.3 * sb * (b2 @ a2)  # (out, in)
        torch.testing.assert_close(sc * (bc @ ac), expected, atol=1e-6, rtol=1e-5)
        with torch.no_grad():  # the base with both weighted deltas folded in by hand
            params[m.removeprefix("base_model.model.") + ".weight"] += expected
    combined, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    with torch.no_grad():
        plain = _logits(PeftModel.from_pretrained(combined, out).eval(), ids)
        torch.testing.assert_close(plain, _logits(base.eval(), ids), atol=1e-4, rtol=0)
    man = json.loads((out / "manifest.json").read_text())
    assert man["combined_from"] == {"sources": [str(p) for p in two_adapters],
                                    "weights": [0.7, 0.3], "method": "cat", "density": None}
    assert man["lora"]["r"] == 8 and man["base"]["name"] == str(tiny_llama)


def test_combine_linear_follows_peft_formula(two_adapters, tmp_path):
    """linear combines the As and the Bs separately, each with sqrt(|weight * scaling|) (the
    sign on A only), so the delta is (sum sqrt B)(sum +-sqrt A), not the sum of deltas."""
    (a, sa), (b, sb) = _pairs(two_adapters[0]), _pairs(two_adapters[1])
    weights = [0.7, -0.3]
    out = combine(list(two_adapters), weights, tmp_path / "c", method="linear")
    c, sc = _pairs(out)
    ws = [w * s for w, s in zip(weights, (sa, sb))]
    wa = [math.copysign(math.sqrt(abs(x)), x) for x in ws]
    wb = [math.sqrt(abs(x)) for x in ws]
    for m, (ac, bc) in c.items():
        (a1, b1), (a2, b2) = a[m], b[m]
        torch.testing.assert_close(ac, wa[0] * a1 + wa[1] * a2, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(bc, wb[0] * b1 + wb[1] * b2, atol=1e-7, rtol=1e-6)
    assert sc == 1.0  # peft sets lora_alpha = r for the combined adapter


def test_combine_ties_follows_peft_formula(two_adapters, tmp_path):
    (a, sa), (b, sb) = _pairs(two_adapters[0]), _pairs(two_adapters[1])
    out = combine(list(two_adapters), [0.7, 0.3], tmp_path / "c", method="ties", density=0.5)
    c, _ = _pairs(out)
    ws = [0.7 * sa, 0.3 * sb]
    roots = [math.sqrt(x) for x in ws]  # positive weights: the same factor on A and on B
    for m, (ac, bc) in c.items():
        for got, parts in ((ac, [a[m][0], b[m][0]]), (bc, [a[m][1], b[m][1]])):
            expected, elected = _ties(parts, roots, 0.5)
            torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)
            # TIES' defining property: every kept value carries its entry's elected sign.
            assert ((got.sign() == elected) | (got == 0)).all()
            assert (got != 0).sum() <= 2 * int(0.5 * got.numel())  # at most both kept halves
    man = json.loads((out / "manifest.json").read_text())
    assert man["combined_from"]["method"] == "ties" and man["combined_from"]["density"] == 0.5


def test_combine_refuses_other_bases(tiny_llama, tiny_tok, tmp_path):
    other = make_llama(tmp_path / "other", tiny_tok, seed=9)
    trained_adapter(tiny_llama, tmp_path / "a")
    trained_adapter(other, tmp_path / "b")
    with pytest.raises(AdaptersError, match="trained on another base than"):
        combine([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "c")
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(AdaptersError, match="no base fingerprint in the manifest"):
        combine([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("path", MERGES)
def test_merge_of_a_packed_archive(path, tiny_llama, tmp_path, ids):
    """A .zip from `adapters pack` merges like its folder, streamed too (it is unpacked once,
    before its manifest is read)."""
    trained_adapter(tiny_llama, tmp_path / "a")
    archive = pack(tmp_path / "a", tmp_path / "shared" / "a.zip")
    assert read_base_name(archive) == str(tiny_llama)
    out, v = MERGES[path](archive, tmp_path / "merged")
    _, got = _merged_logits(out, ids)
    torch.testing.assert_close(got, _reference_logits(tiny_llama, tmp_path / "a", ids),
                               atol=1e-4, rtol=0)
    assert v.max_logit_diff < 1e-4 and v.mean_kl < 1e-6


@pytest.mark.parametrize("path", MERGES)
def test_merge_into_another_base_refused_unless_allowed(path, tiny_llama, tiny_tok, tmp_path,
                                                        ids):
    trained_adapter(tiny_llama, tmp_path / "a")
    other = make_llama(tmp_path / "other", tiny_tok, seed=7)  # same shapes, other weights
    with pytest.raises(AdapterFileError, match="weights differ.*pass allow_base_mismatch"):
        MERGES[path](tmp_path / "a", tmp_path / "m", base=str(other))
    assert not (tmp_path / "m").exists()
    out, v = MERGES[path](tmp_path / "a", tmp_path / "m", base=str(other),
                          allow_base_mismatch=True)
    base, _ = load_base(ModelConfig(name=str(other), dtype="fp32"))
    with torch.no_grad():
        ref = _logits(PeftModel.from_pretrained(base, tmp_path / "a").eval(), ids)
    torch.testing.assert_close(_merged_logits(out, ids)[1], ref, atol=1e-4, rtol=0)
