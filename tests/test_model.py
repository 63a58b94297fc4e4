"""Base loading: fp32, 8-bit and 4-bit on CPU with real bitsandbytes; the embedded default."""

import logging
from pathlib import Path

import pytest
import torch
from conftest import make_gpt2, make_llama

from adapters.config import ModelConfig
from adapters.errors import ModelError
from adapters.model import load_base, resolve_model_path
from adapters.serving.registry import Registry


@pytest.fixture(scope="module")
def small_init_model(request, tmp_path_factory, tiny_tok):
    """Models with GPT-2's usual init (0.02): quantization error is then what users see."""
    return {"gpt2": make_gpt2(tmp_path_factory.mktemp("g"), tiny_tok, initializer_range=0.02),
            "llama": make_llama(tmp_path_factory.mktemp("l"), tiny_tok, initializer_range=0.02)}


def _logits(path, **kw):
    model, tok = load_base(ModelConfig(name=str(path), dtype="fp32", **kw), device="cpu")
    ids = tok("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model, model(ids).logits


@pytest.mark.parametrize("quant,layer,tol", [("8bit", "Linear8bitLt", 0.05),
                                             ("4bit", "Linear4bit", 0.2)])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_quantized_load_gives_bnb_layers_and_close_logits(small_init_model, arch, quant, layer,
                                                          tol):
    _, ref = _logits(small_init_model[arch])
    model, got = _logits(small_init_model[arch], quantization=quant)
    kinds = {type(m).__name__ for m in model.modules()}
    assert layer in kinds
    # Quantization error, not another model: relative (centred) error of the logits.
    centred = ref - ref.mean(-1, keepdim=True)
    err = ((got - got.mean(-1, keepdim=True)) - centred).norm() / centred.norm()
    assert err < tol, f"{quant}: relative logit error {err:.3f}"


def test_fp4_and_single_quant_load(tiny_llama):
    model, _ = _logits(tiny_llama, quantization="4bit", quant_type="fp4", double_quant=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.quant_type == "fp4"


def test_pad_token_without_resizing(tiny_gpt2):
    model, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    assert tok.pad_token is not None
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        resolve_model_path("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


@pytest.mark.default_model
def test_default_model_resolves_from_the_wheel_and_answers(caplog):
    path = resolve_model_path("default")  # converts on first use, then cached
    with caplog.at_level(logging.INFO, logger="adapters"):
        model, tok = load_base(ModelConfig(name="default", dtype="fp32"))
    # from the safetensors cache, not converted from the GGUF again
    assert not [r for r in caplog.records if "converting" in r.getMessage()]
    assert path.endswith("smollm2-135m-instruct") and (Path(path) / "model.safetensors").is_file()
    question = "What is the capital of France?"
    answer = Registry(model, tok).generate([question], chat=True, max_new_tokens=12)[0]
    assert "Paris" in answer
