"""Adapter folders: plain peft loads them; our loader checks base, files and integrity."""

import json

import pytest
import torch
from conftest import make_llama, trained_adapter

from adapters.adapter import (
    inspect_adapter,
    load_adapter,
)
from adapters.config import ModelConfig
from adapters.errors import AdapterFileError
from adapters.model import load_base


@pytest.fixture
def ids(tiny_tok):
    return tiny_tok("import os\nprint(os.getcwd())", return_tensors="pt")["input_ids"]


def test_plain_peft_loads_it_with_identical_logits(tiny_model, tmp_path, ids):
    from peft import PeftModel

    pm, tok = trained_adapter(tiny_model, tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "README.md"}
    base, _ = load_base(ModelConfig(name=str(tiny_model), dtype="fp32"))
    plain = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    base2, tok2 = load_base(ModelConfig(name=str(tiny_model), dtype="fp32"))
    ours = load_adapter(base2, tmp_path / "a", tokenizer=tok2).eval()
    fresh, _ = load_base(ModelConfig(name=str(tiny_model), dtype="fp32"))
    with torch.no_grad():
        # load_base puts models on CUDA when there is one: compare on the CPU.
        a, b, c, ref = (m(ids.to(m.device)).logits.cpu() for m in (plain, ours, pm.eval(), fresh))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
    assert (a - ref).abs().max() > 1e-3  # the adapter really changes the model


def test_manifest_records_what_it_should(tiny_gpt2, tmp_path):
    trained_adapter(tiny_gpt2, tmp_path / "a")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["base"]["name"] == str(tiny_gpt2)
    assert m["base"]["fingerprint"]["model_type"] == "gpt2"
    assert m["lora"]["r"] == 4 and m["quantization"]["quantization"] == "none"
    assert len(m["weights"]["sha256"]) == 64 and m["created"]
    assert {"torch", "peft", "transformers"} <= set(m["versions"])


def test_different_weights_same_shapes_refused_unless_allowed(tiny_llama, tiny_tok, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "a")
    other = make_llama(tmp_path / "other", tiny_tok, seed=7)
    base, tok = load_base(ModelConfig(name=str(other), dtype="fp32"))
    with pytest.raises(AdapterFileError, match="weights differ"):
        load_adapter(base, tmp_path / "a", tokenizer=tok)
    assert load_adapter(base, tmp_path / "a", tokenizer=tok, allow_base_mismatch=True)


def test_same_base_in_bf16_or_4bit_is_accepted(tiny_llama, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "a")
    for cfg in (ModelConfig(name=str(tiny_llama), dtype="bf16"),
                ModelConfig(name=str(tiny_llama), dtype="fp32", quantization="4bit")):
        base, tok = load_base(cfg)
        load_adapter(base, tmp_path / "a", tokenizer=tok)


def test_other_architecture_or_shape_refused(tiny_llama, tiny_tok, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "a")
    wider = make_llama(tmp_path / "wide", tiny_tok, hidden_size=128, intermediate_size=256)
    base, tok = load_base(ModelConfig(name=str(wider), dtype="fp32"))
    with pytest.raises(AdapterFileError, match="another base model.*hidden_size"):
        load_adapter(base, tmp_path / "a", tokenizer=tok)


def test_truncated_weights_named(tiny_gpt2, tmp_path):
    trained_adapter(tiny_gpt2, tmp_path / "a")
    w = tmp_path / "a" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    base, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors: corrupted or truncated"):
        load_adapter(base, tmp_path / "a", tokenizer=tok)
    # Without a manifest the safetensors parser still catches it, naming the file.
    (tmp_path / "a" / "manifest.json").unlink()
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors: not a readable"):
        load_adapter(base, tmp_path / "a", tokenizer=tok)
    assert inspect_adapter(tmp_path / "a")["integrity"].startswith("FAILED")


def test_missing_config_named(tiny_gpt2, tmp_path):
    trained_adapter(tiny_gpt2, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").unlink()
    base, _ = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    with pytest.raises(AdapterFileError, match="adapter_config.json: missing"):
        load_adapter(base, tmp_path / "a")


def test_inspect_reports(tiny_gpt2, tmp_path):
    trained_adapter(tiny_gpt2, tmp_path / "a")
    info = inspect_adapter(tmp_path / "a")
    assert info["integrity"] == "ok" and info["base"] == str(tiny_gpt2)
    assert info["peft"]["r"] == 4 and set(info["peft"]["target_modules"]) == {
        "c_attn", "c_proj", "c_fc"}
    assert info["parameters"] == 4 * (64 * 16) * 2 and info["file_bytes"] > 0
