"""The adapter registry: mixed batches, sampling, stops, eviction (real peft, real files)."""

import pytest
import torch
from conftest import make_gpt2, trained_adapter
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from adapters.config import BASE_NAME, ModelConfig
from adapters.errors import AdapterFileError
from adapters.generation.decode import Request, Sampling, decode
from adapters.model import load_base
from adapters.serving.registry import Registry, RegistryError

PROMPTS = ["import os\n", "def f(x):", "class A:", "# comment"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_gpt2, tiny_llama):
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch, path in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        out[arch] = [root / f"{arch}-{i}" for i in range(4)]
        for i, f in enumerate(out[arch]):
            trained_adapter(path, f, seed=i + 1)
    return out


def registry(path, folders, fast=True, **kw) -> Registry:
    model, tok = load_base(ModelConfig(name=str(path), dtype="fp32", **kw))
    reg = Registry(model, tok, capacity=8, fast=fast)
    for i, f in enumerate(folders):
        reg.load(f"a{i}", f)
    return reg


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mixed_batch_equals_one_adapter_at_a_time(arch, folders, tiny_gpt2, tiny_llama):
    path = {"gpt2": tiny_gpt2, "llama": tiny_llama}[arch]
    reg = registry(path, folders[arch])
    names = [None, "a0", "a1", "a2", "a3"]
    alone = {n: reg.generate(PROMPTS, n, max_new_tokens=10) for n in names}
    assert len({tuple(v) for v in alone.values()}) == len(names)  # each adapter answers its own
    # Each prompt with each model, shuffled into one batch: one forward per token for all rows.
    pairs = [(p, n) for n in names for p in PROMPTS][::-1]
    mixed = reg.generate([p for p, _ in pairs], [n for _, n in pairs], max_new_tokens=10)
    assert mixed == [alone[n][PROMPTS.index(p)] for p, n in pairs]
    assert not any(isinstance(m, LoraLayer) for m in reg.model.modules())  # no peft layers
    # peft's own mixed-batch path gives the same answers as our batched LoRA
    peft_reg = registry(path, folders[arch], fast=False)
    assert peft_reg.generate([p for p, _ in pairs], [n for _, n in pairs],
                             max_new_tokens=10) == mixed


def _hf_greedy(model, tok, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding, cut before the first EOS (decode never emits it)."""
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                         dtype=torch.long), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    return new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


@pytest.mark.parametrize("adapter", [None, "a0"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decode_matches_hf_generate_greedy(arch, adapter, tiny_gpt2, tiny_llama, folders):
    path = {"gpt2": tiny_gpt2, "llama": tiny_llama}[arch]
    reg = registry(path, folders[arch][:2])
    ids = reg.encode(PROMPTS[0])
    n = 16
    model, tok = load_base(ModelConfig(name=str(path), dtype="fp32"))
    if adapter is not None:  # the reference: the adapter through plain peft
        model = PeftModel.from_pretrained(model, str(folders[arch][0]))
    ref = _hf_greedy(model, tok, ids, n)
    assert ref, "the reference stops at once: pick a prompt the random model continues"
    via_registry = reg.run([Request(ids, adapter, Sampling(max_new_tokens=n))])[0]  # batched LoRA
    via_peft = decode(model, tok, [Request(ids, adapter and "default",
                                           Sampling(max_new_tokens=n))],
                      peft=adapter is not None)[0]  # peft's adapter_names
    for out in (via_registry, via_peft):
        assert out.token_ids == ref
        assert out.finish_reason == ("length" if len(ref) == n else "stop")
        assert out.text == reg.tok.decode(ref, skip_special_tokens=True)


def test_sampling_is_seeded_per_request_and_batch_independent(tiny_gpt2, folders):
    reg = registry(tiny_gpt2, folders["gpt2"][:2])
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    one = reg.generate(PROMPTS[:1], "a1", **kw)
    assert one[0]
    assert reg.generate(PROMPTS[:1], "a1", **kw) == one
    # The same request inside a batch with others samples the same tokens (its own generator).
    assert reg.generate(PROMPTS[:3], ["a0", "a1", None], **kw)[1] == reg.generate(
        PROMPTS[1:2], "a1", **kw)[0]
    assert reg.generate(PROMPTS[:1], "a1", **{**kw, "seed": 8}) != one


def test_top_p_keeps_only_the_nucleus(tiny_gpt2, folders):
    reg = registry(tiny_gpt2, folders["gpt2"][:1])
    greedy = reg.generate(PROMPTS, "a0", max_new_tokens=8)
    assert all(greedy)
    # A nucleus this small holds only the most likely token: sampling becomes greedy.
    assert reg.generate(PROMPTS, "a0", max_new_tokens=8, temperature=1.0, top_p=1e-6) == greedy


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(tiny_gpt2, folders):
    reg = registry(tiny_gpt2, folders["gpt2"][:1])
    full = reg.generate(PROMPTS[:1], "a0", max_new_tokens=20)[0]
    assert len(full) > 8
    stop = full[5:8]
    pieces: list[str] = []
    req = Request(reg.encode(PROMPTS[0]), "a0", Sampling(max_new_tokens=20, stop=(stop,)),
                  on_text=pieces.append)
    out = reg.run([req])[0]
    assert out.text == full[:full.index(stop)] and out.finish_reason == "stop"
    assert "".join(pieces) == out.text


def test_chat_prompts_use_the_chat_template(tiny_gpt2, folders):
    reg = registry(tiny_gpt2, folders["gpt2"][:1])
    ids = reg.encode([{"role": "user", "content": "hi"}])
    text = reg.tok.decode(ids)  # ChatML fallback (turns end in the tokenizer's EOS)
    assert text.startswith("<|im_start|>user\nhi") and text.endswith("<|im_start|>assistant\n")
    assert reg.encode("hi", chat=True) == ids


def test_eviction_is_least_recently_used_and_spares_adapters_in_use(tiny_gpt2, folders):
    model, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    reg = Registry(model, tok, capacity=2)
    f = folders["gpt2"]
    assert reg.load("a", f[0]) == [] and reg.load("b", f[1]) == []
    reg.generate(PROMPTS[:1], "a", max_new_tokens=2)  # "a" is now the most recent
    assert reg.load("c", f[2]) == ["b"]
    assert reg.names() == ["a", "c"]
    reg.acquire(["a"])  # a request is using "a" (as the server does while decoding)
    reg.generate(PROMPTS[:1], "c", max_new_tokens=2)  # so "a" is older, but busy
    assert reg.load("d", f[3]) == ["c"]
    with pytest.raises(RegistryError, match="in use"):
        reg.unload("a")
    reg.release(["a"])
    reg.unload("a")
    assert reg.names() == ["d"] and reg.peft_name("d") is None  # batched: no peft layers
    with pytest.raises(RegistryError, match="no adapter named"):
        reg.generate(PROMPTS[:1], "a")


def test_names_are_checked_and_a_wrong_base_is_refused(tiny_gpt2, tiny_llama, folders):
    reg = registry(tiny_gpt2, [])
    for bad in ["", "a/b", "../x", "x" * 65, BASE_NAME, ".", "..", "-x", "a\x00"]:
        with pytest.raises(RegistryError, match="adapter name"):
            reg.load(bad, folders["gpt2"][0])
    with pytest.raises(AdapterFileError, match="another base"):
        reg.load("llama", folders["llama"][0])
    assert reg.generate(PROMPTS[:1], None, max_new_tokens=3)[0]  # the base still answers


def test_mixed_batch_on_a_4bit_base(tiny_llama, folders):
    torch.manual_seed(0)
    reg = registry(tiny_llama, folders["llama"][:3], quantization="4bit")
    names = ["a0", "a1", None, "a2"]
    alone = [reg.generate([p], n, max_new_tokens=6)[0] for p, n in zip(PROMPTS, names)]
    assert all(alone)
    assert reg.generate(PROMPTS, names, max_new_tokens=6) == alone


def test_a_load_that_fails_half_way_leaves_the_model_as_it_was(tiny_gpt2, tiny_tok, tmp_path,
                                                                 folders):
    # An adapter for a narrower GPT-2 and no manifest to refuse it early: peft wraps the layers
    # in place, then fails on the first tensor of the wrong shape.
    other = make_gpt2(tmp_path / "other", tiny_tok, n_embd=32)
    trained_adapter(other, tmp_path / "wrong")
    (tmp_path / "wrong" / "manifest.json").unlink()
    model, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    reg = Registry(model, tok, capacity=1)
    before = reg.generate(PROMPTS, None, max_new_tokens=6)
    with pytest.raises(AdapterFileError, match="does not fit"):
        reg.load("w", tmp_path / "wrong")  # the first load: the plain base was wrapped
    assert not any(isinstance(m, LoraLayer) for m in reg.model.modules())
    assert reg.generate(PROMPTS, None, max_new_tokens=6) == before
    reg.load("v1.2", folders["gpt2"][0])  # a dotted name (peft refuses "." in its own)
    ours = reg.generate(PROMPTS, "v1.2", max_new_tokens=6)
    assert ours != before
    for bad in (tmp_path / "wrong", tmp_path / "missing"):  # replacing, at full capacity
        with pytest.raises(AdapterFileError):
            reg.load("v1.2", bad)
        with pytest.raises(AdapterFileError):
            reg.load("other", bad)
        assert reg.names() == ["v1.2"]
        assert not any(isinstance(m, LoraLayer) for m in reg.model.modules())
        assert reg.generate(PROMPTS, "v1.2", max_new_tokens=6) == ours
    assert reg.load("v1.2", folders["gpt2"][1]) == []  # a good reload swaps it
    assert reg.generate(PROMPTS, "v1.2", max_new_tokens=6) != ours


def test_a_row_that_fails_ends_alone_and_the_batch_goes_on(tiny_gpt2, folders):
    reg = registry(tiny_gpt2, folders["gpt2"][:2])
    names = ["a0", "a1", None, "a0"]
    alone = [reg.generate([p], n, max_new_tokens=8)[0] for p, n in zip(PROMPTS, names)]
    done: list[int] = []

    def gone(text):  # what call_soon_threadsafe does once the server's event loop is closed
        raise RuntimeError("Event loop is closed")

    bad = Request(reg.encode(PROMPTS[0]), "a1", Sampling(8, temperature=0.7, seed=3), on_text=gone,
                  on_done=lambda out: done.append(len(out.token_ids)))
    reqs = [Request(reg.encode(p), n, Sampling(8)) for p, n in zip(PROMPTS, names)]
    outs = reg.run(reqs[:2] + [bad] + reqs[2:])
    assert [o.text for i, o in enumerate(outs) if i != 2] == alone
    assert outs[2].finish_reason == "error" and "Event loop is closed" in outs[2].error
    assert done == [len(outs[2].token_ids)] and done[0] >= 1  # told once, when it failed
    # a temperature too small to divide by is greedy; a seed past 64 bits wraps
    tiny = reg.generate(PROMPTS, names, max_new_tokens=8, temperature=1e-40, seed=2**64 + 5)
    assert tiny == alone


def test_stop_strings_are_found_across_token_boundaries(tiny_gpt2, folders):
    reg = registry(tiny_gpt2, folders["gpt2"][:1])
    full = reg.generate(PROMPTS[1:2], "a0", max_new_tokens=24)[0]
    assert len(full) > 20
    for k in range(0, 16, 3):  # stops of 5 characters starting anywhere in the answer
        stop = full[k:k + 5]
        decoy = "\x00never" * 40
        out = reg.generate(PROMPTS[1:2], "a0", max_new_tokens=24, stop=[decoy, stop])[0]
        assert out == full[:full.index(stop)], (k, stop)
