"""The parity certificate: one adapter, the same prompts, every runtime installed here."""

import json
import os
import zipfile

import pytest
import torch
from conftest import run_cli, trained_adapter
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from adapters.adapter import build_manifest, inspect_adapter, read_manifest, save_adapter
from adapters.config import ModelConfig
from adapters.model import load_base
from adapters.share import gguf_lora, parity
from adapters.share.llama_runtime import have_llama_cpp

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:", "What is 3 plus 4?"]
# CI installs llama.cpp's runtime (scripts/setup): there its row must be in the certificate
LLAMA = have_llama_cpp() or bool(os.environ.get("CI"))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("parity") / "a"
    trained_adapter(tiny_llama, out, seed=3)
    return out


def test_every_runtime_agrees_and_the_certificate_is_kept(adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.replace("\n", " ") for p in PROMPTS))
    code, out, err = run_cli("verify", str(adapter), "--parity", "--prompts", str(prompts),
                             "--new-tokens", "12", capsys=capsys)
    assert code == 0, out + err
    man = read_manifest(adapter)
    rows = {r.runtime: r for r in man.parity.rows}
    want = {"peft (reference)", "adapters", "adapters-mixed", "merged"} | (
        {"llama.cpp"} if LLAMA else set())
    assert set(rows) == want, out
    for r in rows.values():
        assert r.passed and r.top1 >= 0.99 and r.greedy >= 0.95, r
    assert man.parity.prompts == 4 and man.parity.new_tokens == 12
    assert "merged-quantized" in man.parity.skipped and "vllm" in man.parity.skipped
    card = (adapter / "README.md").read_text()
    assert "## Parity certificate" in card and "| adapters-mixed |" in card
    assert inspect_adapter(adapter)["parity"]["passed"] is True
    # pack keeps it; verify on the received zip runs it again and leaves the zip as it was
    code, _, _ = run_cli("pack", str(adapter), "--out", str(tmp_path / "a.zip"))
    assert code == 0
    with zipfile.ZipFile(tmp_path / "a.zip") as z:
        inside = json.loads(z.read("manifest.json"))
    assert inside["parity"]["rows"][1]["runtime"] == "adapters"
    before = (tmp_path / "a.zip").read_bytes()
    code, out, _ = run_cli("verify", str(tmp_path / "a.zip"), "--parity", "--prompts",
                           str(prompts), "--new-tokens", "8", "--runtimes", "adapters",
                           capsys=capsys)
    assert code == 0 and "ok    adapters" in out
    assert (tmp_path / "a.zip").read_bytes() == before


@pytest.mark.skipif(not LLAMA, reason="llama.cpp's runtime is not installed")
def test_a_broken_export_fails_naming_the_projection(adapter, monkeypatch):
    """An exporter whose name map lost q_proj writes a file llama.cpp loads: the certificate
    fails and names what is missing."""
    real = gguf_lora.lora_tensors

    def lossy(folder, manifest):
        tensors, alpha = real(folder, manifest)
        return [t for t in tensors if ".attn_q." not in t.name], alpha

    monkeypatch.setattr(gguf_lora, "lora_tensors", lossy)
    info = parity.certify(adapter, None, PROMPTS, 8, ("llama.cpp",))
    row = info.rows[-1]
    assert row.runtime == "llama.cpp" and not row.passed and not info.passed
    assert "lacks 2 of the adapter's LoRA modules" in row.note
    assert "self_attn.q_proj" in row.note


def test_modules_a_runtime_cannot_hold_are_named_with_the_way_out(tiny_llama, tmp_path):
    """LoRA with a whole saved lm_head: llama.cpp cannot hold it and the certificate says so
    by name with what to do instead; the registry (which serves it through peft) and the
    merge agree with peft."""
    model, tok = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    pm = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                              modules_to_save=["lm_head"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter(pm, tmp_path / "m", build_manifest(pm.get_base_model(), tok, str(tiny_llama)))
    runtimes = ("adapters", "merged") + (("llama.cpp",) if LLAMA else ())
    info = parity.certify(tmp_path / "m", None, PROMPTS[:2], 8, runtimes)
    rows = {r.runtime: r for r in info.rows}
    assert rows["merged"].passed and rows["adapters"].passed
    if LLAMA:
        assert not rows["llama.cpp"].passed and "could not run" in rows["llama.cpp"].note
        assert "modules_to_save" in rows["llama.cpp"].note
        assert "--to gguf" in rows["llama.cpp"].note


def test_a_quantized_adapter_gets_its_merge_checked_quantized(tiny_llama, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "q", seed=4, quantization="4bit")
    info = parity.certify(tmp_path / "q", None, PROMPTS[:3], 8, ("merged-quantized",))
    row = info.rows[-1]
    assert row.runtime == "merged-4bit" and row.precision == "4bit" and not info.skipped
    # figures, not a verdict: on a 64-wide random model nf4's rounding alone moves the argmax
    # (the README gives the default model's); the row must exist and hold real numbers
    assert 0 <= row.top1 <= 1 and row.kl > 0 and row.threshold.startswith(">= 75% top-1, KL <= 0.5")
