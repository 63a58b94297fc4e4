"""`adapters export` (GGUF LoRA, merged GGUF, Ollama, older peft) and `verify --target`.

The GGUF files are checked by two readers that are not ours: transformers' GGUF loader (it
undoes llama.cpp's q/k row order on its own) and llama.cpp itself (its prebuilt runtime,
which scripts/setup installs; in CI its absence fails these tests instead of skipping them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import make_llama, run_cli, trained_adapter
from peft import LoraConfig as PeftLoraConfig
from transformers import AutoModelForCausalLM

from adapters.adapter import CONFIG_FILE, build_manifest, save_adapter
from adapters.config import LoraConfig, ModelConfig
from adapters.lora import attach_lora
from adapters.model import load_base
from adapters.share.export import export, runtime_report
from adapters.share.gguf_base import write_hf_gguf
from adapters.share.gguf_io import ExportError
from adapters.share.llama_runtime import INSTALL_HINT, have_llama_cpp, llama_cpp_logits
from adapters.share.peft_fields import LORA_CONFIG_FIELDS
from adapters.share.runtime_check import agreement, gate


@pytest.fixture
def llama_cpp():
    """llama.cpp's runtime; in CI (CI set) its absence is the test's failure, never a skip."""
    if not have_llama_cpp():
        if os.environ.get("CI"):
            pytest.fail(f"{INSTALL_HINT} (CI is set: this test may not be skipped)")
        pytest.skip(INSTALL_HINT)


needs_llama_cpp = pytest.mark.usefixtures("llama_cpp")

PROMPT = "def join(a, b):\n    return a + b\n"


def _adapter(base, out, seed=1, **lora_kw):
    """An adapter with random non-zero B (as trained_adapter) and any LoRA settings."""
    cfg = ModelConfig(name=str(base), dtype="fp32")
    model, tok = load_base(cfg)
    lcfg = LoraConfig(**{"r": 4, **lora_kw})
    pm = attach_lora(model, lcfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.normal_(0.5 if "magnitude" in n else 0, 0.05)
    save_adapter(pm, out, build_manifest(pm.get_base_model(), tok, str(base), cfg, lcfg))
    return pm, tok


def test_lora_gguf_has_llama_cpp_names_and_keys(tiny_model, tmp_path, capsys):
    trained_adapter(tiny_model, tmp_path / "ad")
    code, out, err = run_cli("export", tmp_path / "ad", "--to", "gguf-lora", "--out",
                             tmp_path / "ad.gguf", "--no-verify", capsys=capsys)
    assert code == 0, err
    r = gguf.GGUFReader(str(tmp_path / "ad.gguf"))
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "lora"
    assert r.get_field("adapter.lora.alpha").contents() == json.loads(
        (tmp_path / "ad" / CONFIG_FILE).read_text())["lora_alpha"]
    names = {t.name: t for t in r.tensors}
    arch = r.get_field("general.architecture").contents()
    fused = "blk.0.attn_qkv.weight" if arch == "gpt2" else "blk.0.attn_q.weight"
    a, b = names[fused + ".lora_a"], names[fused + ".lora_b"]
    # GGUF shapes are ggml's ne: lora_a is [in, r], lora_b [r, out]
    assert list(a.shape) == [64, 4] and int(b.shape[0]) == 4
    assert int(b.shape[1]) == (192 if arch == "gpt2" else 64)
    assert all(n.endswith((".lora_a", ".lora_b")) for n in names)


def test_merged_gguf_loads_in_transformers_as_base_plus_adapter(tiny_model, tmp_path, capsys):
    pm, tok = trained_adapter(tiny_model, tmp_path / "ad")
    code, _, err = run_cli("export", tmp_path / "ad", "--to", "gguf", "--outtype", "f32",
                           "--out", tmp_path / "m.gguf", "--no-verify", capsys=capsys)
    assert code == 0, err
    extra = {"n_positions": 256} if pm.config.model_type == "gpt2" else {}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                              **extra)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        ref, got, plain = pm(ids).logits, hf(ids).logits, pm.get_base_model()(ids).logits
    with pm.disable_adapter(), torch.no_grad():
        plain = pm(ids).logits
    assert (ref - plain).abs().max() > 1e-2  # the adapter matters...
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)  # ...and is in the file


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_folded_into_a_gguf_base_equals_peft(tiny_model, tmp_path, rslora):
    """--base-gguf: base GGUF + our LoRA tensors (rsLoRA's scale folded into B), read back by
    transformers, equal peft's base + adapter."""
    pm, tok = _adapter(tiny_model, tmp_path / "ad", use_rslora=rslora)
    write_hf_gguf(tiny_model, tmp_path / "base.gguf", "f32")
    export(tmp_path / "ad", "gguf", tmp_path / "m.gguf", base_gguf=tmp_path / "base.gguf",
           out_type="f32", verify=False)
    extra = {"n_positions": 256} if pm.config.model_type == "gpt2" else {}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                              **extra)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, pm(ids).logits, atol=1e-4, rtol=1e-4)


def test_q8_0_merged_gguf_is_close(tiny_llama, tmp_path):
    pm, tok = trained_adapter(tiny_llama, tmp_path / "ad")
    export(tmp_path / "ad", "gguf", tmp_path / "q.gguf", out_type="q8_0", verify=False)
    r = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    assert {t.tensor_type.name for t in r.tensors} == {"Q8_0", "F32"}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        got, ref = hf(ids).logits[0], pm(ids).logits[0]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    print(f"q8_0: max logit diff {(got - ref).abs().max():.3f}, mean KL {kl:.2e}")
    assert 0 < (got - ref).abs().max() and kl < 5e-3  # 8-bit rounding, nothing more


def test_dora_refused_with_reason(tiny_llama, tmp_path, capsys):
    _adapter(tiny_llama, tmp_path / "dora", use_dora=True)
    code, out, err = run_cli("export", tmp_path / "dora", "--to", "gguf-lora", "--out",
                             tmp_path / "d.gguf", "--no-verify", capsys=capsys)
    assert code == 1 and "use_dora" in err and "--to gguf" in err
    assert not (tmp_path / "d.gguf").exists()
    code, out, _ = run_cli("verify", tmp_path / "dora", "--target", "llama.cpp",
                           "--target", "vllm", capsys=capsys)
    assert code == 1
    assert "FAIL  llama.cpp: use_dora" in out and "FAIL  vllm: use_dora" in out


def test_vllm_rank_600_fails_naming_max_lora_rank(tiny_llama, tmp_path, capsys):
    _adapter(tiny_llama, tmp_path / "big", r=600)
    code, out, _ = run_cli("verify", tmp_path / "big", "--target", "vllm", capsys=capsys)
    assert code == 1
    line = next(x for x in out.splitlines() if "vllm: rank" in x)
    assert line.startswith("FAIL") and "max_lora_rank" in line and "600" in line


def test_vllm_rank_above_server_limit_names_the_flag(tiny_llama, tmp_path, capsys):
    _adapter(tiny_llama, tmp_path / "r32", r=32)
    code, out, _ = run_cli("verify", tmp_path / "r32", "--target", "vllm", capsys=capsys)
    assert code == 1 and "--max-lora-rank 32" in out
    code, out, _ = run_cli("verify", tmp_path / "r32", "--target", "vllm", "--max-lora-rank",
                           "32", capsys=capsys)
    assert code == 0, out
    assert run_cli("pack", tmp_path / "r32", "-o", tmp_path / "r32.zip")[0] == 0
    code, out, _ = run_cli("verify", tmp_path / "r32.zip", "--target", "vllm", capsys=capsys)
    assert code == 1 and "--max-lora-rank 32" in out  # archives are checked the same way


def test_vllm_refuses_gpt2_and_llama_cpp_accepts_it(tiny_gpt2, tmp_path, capsys):
    trained_adapter(tiny_gpt2, tmp_path / "g")
    code, out, _ = run_cli("verify", tmp_path / "g", "--target", "vllm", "--target",
                           "llama.cpp", capsys=capsys)
    assert code == 1
    assert "FAIL  vllm: architecture" in out and "ok    llama.cpp: tensors" in out


def _construct(version: str, cfg: dict):
    """That release's LoraConfig signature: a dataclass of its recorded fields."""
    cls = dataclasses.make_dataclass(
        f"LoraConfig_{version}", [(f, object, None) for f in LORA_CONFIG_FIELDS[version]])
    return cls(**cfg)


def test_export_for_older_peft_constructs_its_lora_config(tiny_llama, tmp_path, capsys):
    trained_adapter(tiny_llama, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    with pytest.raises(TypeError, match="unexpected keyword"):
        _construct("0.10.0", cfg)  # what older peft says about today's file
    code, out, err = run_cli("export", tmp_path / "ad", "--to", "peft", "--peft-version", "0.10",
                             "--out", tmp_path / "old", capsys=capsys)
    assert code == 0, err
    old = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    made = _construct("0.10.0", old)
    assert made.r == 4 and made.target_modules == cfg["target_modules"]
    assert PeftLoraConfig.from_pretrained(tmp_path / "old").r == 4  # still loads today
    assert run_cli("verify", tmp_path / "old", capsys=capsys)[0] == 0  # weights untouched


OLD_PEFT = os.environ.get("ADAPTERS_OLD_PEFT")  # a `pip install --target` folder of an old peft


@pytest.mark.skipif(not OLD_PEFT, reason="needs an older peft beside ours: run "
                                         "scripts/check_interop --old-peft 0.13.2")
def test_older_peft_itself_loads_the_export(tiny_llama, tmp_path, capsys):
    trained_adapter(tiny_llama, tmp_path / "ad")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import peft; "
            "from peft import LoraConfig; c = LoraConfig.from_pretrained(sys.argv[2]); "
            "print(peft.__version__, c.r, sorted(c.target_modules))")
    version = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                              " import peft; print(peft.__version__)", OLD_PEFT],
                             capture_output=True, text=True, check=True).stdout.strip()
    today = subprocess.run([sys.executable, "-c", code, OLD_PEFT, str(tmp_path / "ad")],
                           capture_output=True, text=True)
    assert today.returncode != 0 and "unexpected keyword argument" in today.stderr
    assert run_cli("export", tmp_path / "ad", "--to", "peft", "--peft-version", version,
                   "--out", tmp_path / "old", capsys=capsys)[0] == 0
    old = subprocess.run([sys.executable, "-c", code, OLD_PEFT, str(tmp_path / "old")],
                         capture_output=True, text=True)
    assert old.returncode == 0, old.stderr
    assert old.stdout.split()[:2] == [version, "4"]


def test_export_for_older_peft_refuses_a_non_default_new_field(tiny_llama, tmp_path, capsys):
    trained_adapter(tiny_llama, tmp_path / "ad")
    path = tmp_path / "ad" / CONFIG_FILE
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "lora_bias": True}))
    code, _, err = run_cli("export", tmp_path / "ad", "--to", "peft", "--peft-version", "0.13",
                           "--out", tmp_path / "old", capsys=capsys)
    assert code == 1 and "lora_bias" in err and "newer peft" in err
    assert not (tmp_path / "old").exists()
    code, out, _ = run_cli("verify", tmp_path / "ad", "--target", "peft==0.13", "--target",
                           "peft==0.14", capsys=capsys)
    assert code == 1
    assert "FAIL  peft==0.13.2: lora_bias" in out  # unknown to 0.13, and not the default
    assert "ok    peft==0.14: fields" in out  # 0.14 added lora_bias


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_ollama_modelfile_from_chat_template(tiny_tok, tmp_path, capsys):
    tok = tiny_tok.__class__.from_pretrained(tiny_tok.name_or_path)
    tok.chat_template = CHATML
    base = make_llama(tmp_path / "base", tok)
    trained_adapter(base, tmp_path / "ad")
    code, out, err = run_cli("export", tmp_path / "ad", "--to", "ollama", "--out",
                             tmp_path / "oll", "--name", "tiny", "--no-verify", capsys=capsys)
    assert code == 0, err
    text = (tmp_path / "oll" / "Modelfile").read_text()
    assert text.startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\n")
    assert ('{{ if eq .Role "user" }}' not in text
            and '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
            in text)
    assert text.rstrip().endswith('PARAMETER stop "<|im_end|>"')
    assert '"<|endoftext|>"' in text  # the EOS token stops too
    for f in ("base.gguf", "adapter.gguf"):
        assert gguf.GGUFReader(str(tmp_path / "oll" / f)).tensors
    assert "ollama create tiny -f" in out and "ollama run tiny" in out


def test_ollama_without_chat_template_says_so(tiny_llama, tmp_path, capsys):
    trained_adapter(tiny_llama, tmp_path / "ad")
    code, out, _ = run_cli("export", tmp_path / "ad", "--to", "ollama", "--out", tmp_path / "o",
                           "--no-verify", capsys=capsys)
    assert code == 0 and "no TEMPLATE written" in out
    assert "TEMPLATE" not in (tmp_path / "o" / "Modelfile").read_text()


# --- llama.cpp itself ----------------------------------------------------------------------


def test_without_llama_cpp_the_gguf_is_written_and_says_unchecked(tiny_model, tmp_path, capsys,
                                                                  monkeypatch):
    trained_adapter(tiny_model, tmp_path / "ad")
    monkeypatch.setenv("ADAPTERS_LLAMA_RUNTIME", str(tmp_path / "no-runtime"))
    code, out, err = run_cli("export", tmp_path / "ad", "--to", "gguf-lora", "--out",
                             tmp_path / "ad.gguf", capsys=capsys)
    assert code == 0, err
    assert "not verified in llama.cpp: it is not installed here" in out
    reader = gguf.GGUFReader(str(tmp_path / "ad.gguf"))  # a complete file all the same
    assert any(t.name.endswith("lora_a") for t in reader.tensors)


@needs_llama_cpp
def test_llama_cpp_applies_the_lora_like_ours(tiny_model, tmp_path, capsys):
    trained_adapter(tiny_model, tmp_path / "ad")
    code, out, err = run_cli("export", tmp_path / "ad", "--to", "gguf-lora", "--out",
                             tmp_path / "ad.gguf", "--max-kl", "0.001", capsys=capsys)
    assert code == 0, err
    assert "base + adapter  : top-1 100.0%" in out
    res = export(tmp_path / "ad", "gguf-lora", tmp_path / "b.gguf", max_kl=1e-3)
    rep = res.report
    assert rep.base.mean_kl < 1e-4 and rep.adapted.mean_kl < 1e-4  # f32 base: no floor
    assert rep.effect_ours > 1e-2  # the adapter moves the logits...
    assert rep.effect_runtime == pytest.approx(rep.effect_ours, rel=0.05)  # ...in both


@needs_llama_cpp
def test_gate_catches_a_lora_llama_cpp_does_not_apply(tiny_llama, tmp_path):
    trained_adapter(tiny_llama, tmp_path / "ad")
    res = export(tmp_path / "ad", "gguf-lora", tmp_path / "ok.gguf", verify=False)
    # Scramble the exported B rows (as a missing q/k permutation would): llama.cpp then
    # computes another model, and the gate must say so.
    r = gguf.GGUFReader(str(res.out))
    w = gguf.GGUFWriter(tmp_path / "bad.gguf", "llama")
    for key in ("general.type", "adapter.type", "adapter.lora.alpha"):
        f = r.get_field(key)
        w.add_key_value(key, f.contents(), f.types[0])
    for t in r.tensors:
        data = np.array(t.data)
        w.add_tensor(t.name, data[::-1].copy() if t.name.endswith("lora_b") else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from adapters.share.export import _base_gguf, _open

    src = _open(tmp_path / "ad", None)
    with _base_gguf(src, None) as bg:
        rep = runtime_report(src, bg, tmp_path / "bad.gguf", lora=True)
    with pytest.raises(ExportError, match="departs from ours"):
        gate(rep, 1e-3, "bad.gguf")


@needs_llama_cpp
def test_merged_gguf_equals_base_plus_lora_in_llama_cpp(tiny_model, tmp_path):
    from adapters.share.export import _base_gguf, _open

    pm, tok = trained_adapter(tiny_model, tmp_path / "ad")
    lora = export(tmp_path / "ad", "gguf-lora", tmp_path / "l.gguf", verify=False).out
    merged = export(tmp_path / "ad", "gguf", tmp_path / "m.gguf", out_type="f32").out
    ids = [tok(PROMPT)["input_ids"]]
    with _base_gguf(_open(tmp_path / "ad", None), None) as bg:
        with_lora = llama_cpp_logits(bg, ids, lora=lora)
        plain = llama_cpp_logits(bg, ids)
    merged_logits = llama_cpp_logits(merged, ids)
    np.testing.assert_allclose(merged_logits[0], with_lora[0], atol=2e-3)
    assert agreement(with_lora, plain).mean_kl > 1e-2


@needs_llama_cpp
@pytest.mark.default_model
def test_default_model_export_in_llama_cpp(tmp_path, capsys):
    trained_adapter("default", tmp_path / "ad", dtype="fp32")
    res = export(tmp_path / "ad", "gguf-lora", tmp_path / "ad.gguf", max_kl=0.1)
    rep = res.report
    print("\n".join(rep.lines()))
    assert rep.base.mean_kl > 0  # the Q4_1 base file is not our fp32 copy of it...
    assert rep.adapted.mean_kl < 0.1 and rep.adapted.top1 > 0.8  # ...but close
    assert rep.effect_runtime == pytest.approx(rep.effect_ours, rel=0.3)
