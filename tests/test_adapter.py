"""Adapter folders: plain peft loads them; our loader checks base, files and integrity;
the typed manifest names the file and field at fault and keeps keys it does not know."""

import json

import pytest
import torch
from conftest import make_llama, trained_adapter

from adapters.adapter import (
    Manifest,
    check_files,
    inspect_adapter,
    load_adapter,
    read_manifest,
)
from adapters.config import BASE_NAME, ModelConfig
from adapters.errors import AdapterFileError
from adapters.eval.record import record_eval
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
    """Accepted means loaded: the file's fp32 tensors, adding scale * x A^T B^T per layer."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    trained_adapter(tiny_llama, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    peft_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    scale = peft_cfg["lora_alpha"] / peft_cfg["r"]
    assert scale == 8.0  # alpha 32, r 4: the adapter's path is far from negligible
    for cfg, dtype in ((ModelConfig(name=str(tiny_llama), dtype="bf16"), torch.bfloat16),
                       (ModelConfig(name=str(tiny_llama), dtype="fp32", quantization="4bit"),
                        torch.float32)):
        base, tok = load_base(cfg)
        pm = load_adapter(base, tmp_path / "a", tokenizer=tok)
        # The adapter keeps its own fp32 weights on a bf16 or 4-bit base: bit for bit the file.
        loaded = get_peft_model_state_dict(pm)
        assert loaded.keys() == saved.keys() and len(saved) == 28  # 7 projections x 2 layers
        for k, want in saved.items():
            assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k].cpu(), want), k
        # And each LoRA layer adds exactly what the file's tensors say to its base's output.
        layers = {n: m for n, m in pm.named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
        assert len(layers) == 14
        with torch.no_grad():
            for name, layer in layers.items():
                a, b = saved[f"{name}.lora_A.weight"], saved[f"{name}.lora_B.weight"]
                x = torch.randn(2, 5, a.shape[1], generator=torch.Generator().manual_seed(0))
                x = x.to(dtype=dtype, device=pm.device)
                y, y_base = layer(x).float().cpu(), layer.base_layer(x).float().cpu()
                want = scale * (x.float().cpu() @ a.t() @ b.t())  # (2, 5, d_out)
                # bf16 rounds each output to ~2^-8 of its size; the adapter's part is > 1.
                tol = 2.0 ** -7 * float(y.abs().max()) if dtype == torch.bfloat16 else 1e-5
                assert want.abs().max() > 10 * tol, name
                torch.testing.assert_close(y - y_base, want, atol=tol, rtol=0,
                                           msg=lambda m, name=name: f"{name}: {m}")


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


def _edit_manifest(folder, change):
    path = folder / "manifest.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("change,message", [
    (lambda m: [m], r"manifest.json: must be a JSON object .* got a list"),
    (lambda m: {**m, "base": "x"}, r"manifest.json: field 'base' must be an object .*got a "
                                   r"string \"x\""),
    (lambda m: {**m, "weights": "x"}, r"manifest.json: field 'weights' must be an object "
                                      r"\(file, sha256, bytes\), got a string"),
    (lambda m: {k: v for k, v in m.items() if k != "base"}, r"field 'base' .* it is missing"),
    (lambda m: {**m, "lora": {**m["lora"], "r": "4"}}, r"field 'lora.r' must be an integer"),
])
def test_invalid_manifest_is_one_clear_error(tiny_gpt2, tmp_path, change, message):
    trained_adapter(tiny_gpt2, tmp_path / "a")
    _edit_manifest(tmp_path / "a", change)
    with pytest.raises(AdapterFileError, match=message) as e:
        check_files(tmp_path / "a")
    assert str(tmp_path / "a" / "manifest.json") in str(e.value) and "\n" not in str(e.value)
    base, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(base, tmp_path / "a", tokenizer=tok)
    assert inspect_adapter(tmp_path / "a")["integrity"].startswith("FAILED")


def test_unknown_keys_load_and_survive_a_rewrite(tiny_gpt2, tmp_path):
    """A manifest from a newer adapterkit: extra keys at the top and inside sections."""
    trained_adapter(tiny_gpt2, tmp_path / "a")
    _edit_manifest(tmp_path / "a", lambda m: {
        **m, "future_section": {"x": [1, 2]},
        "base": {**m["base"], "revision": "abc"},
        "weights": {**m["weights"], "dtype": "fp32"}})
    base, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    assert load_adapter(base, tmp_path / "a", tokenizer=tok)
    man = read_manifest(tmp_path / "a")
    assert man.extra == {"future_section": {"x": [1, 2]}} and man.base.extra == {"revision": "abc"}
    rows = [{"model": "a", "dataset": "d", "loss": 1.5, "tokens": 10},
            {"model": BASE_NAME, "dataset": "d", "loss": 2.0, "tokens": 10}]
    record_eval(tmp_path / "a", "a", rows)  # rewrites manifest.json through Manifest
    again = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert again["future_section"] == {"x": [1, 2]} and again["base"]["revision"] == "abc"
    assert again["weights"]["dtype"] == "fp32"
    assert again["eval"][0]["adapter"] == {"loss": 1.5, "tokens": 10}
    assert again["eval"][0]["base"] == {"loss": 2.0, "tokens": 10}
    assert check_files(tmp_path / "a").eval[0].dataset == "d"  # hash untouched: still intact
    assert "| d | adapter | 1.5 | 10 |" in (tmp_path / "a" / "README.md").read_text()


def test_manifest_round_trips_and_keeps_the_old_keys(tiny_gpt2, tmp_path):
    trained_adapter(tiny_gpt2, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert list(raw) == ["format", "base", "quantization", "lora", "versions", "weights",
                         "created"]
    assert Manifest.from_dict(raw).to_dict() == raw
    # An older, hand-written manifest: sparse lora, no weights section: loads, hash unchecked.
    _edit_manifest(tmp_path / "a", lambda m: {"format": m["format"], "base": m["base"],
                                              "lora": {"r": 4, "alpha": 8}})
    man = check_files(tmp_path / "a")
    assert man.weights is None and man.lora.r == 4 and man.lora.targets is None
