"""LoRA attach: presets per architecture, frozen base, exact trainable counts."""

import pytest
import torch

from adapters.config import LoraConfig, ModelConfig
from adapters.errors import ModelError
from adapters.lora import attach_lora, trainable_report
from adapters.model import load_base


def _expected(cfg, r: int) -> int:
    """r * (in + out) per adapted matrix, from the architecture's own sizes."""
    if cfg.model_type == "gpt2":
        d, inner = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
        per_layer = (d + 3 * d) + (d + d) + (d + inner) + (inner + d)  # c_attn, c_proj x2, c_fc
        return r * per_layer * cfg.n_layer
    d, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    per_layer = (d + d) + 2 * (d + kv) + (d + d) + 2 * (d + i) + (i + d)
    return r * per_layer * cfg.num_hidden_layers


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_only_lora_trains_and_count_matches_formula(tiny_model, quant):
    model, _ = load_base(ModelConfig(name=str(tiny_model), dtype="fp32", quantization=quant))
    peft_model = attach_lora(model, LoraConfig(r=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable_report(peft_model)["trainable"] == _expected(model.config, 4)


def test_explicit_targets_and_all_linear(tiny_llama):
    model, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    pm = attach_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    names = {n.split(".")[-4] for n, p in pm.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "v_proj"}
    model, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    pm = attach_lora(model, LoraConfig(r=2, targets="all-linear"))
    assert trainable_report(pm)["trainable"] == _expected(model.config, 2)  # lm_head excluded


def test_dora_and_rslora_attach(tiny_llama):
    model, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    pm = attach_lora(model, LoraConfig(r=2, use_dora=True, use_rslora=True))
    assert any("lora_magnitude_vector" in n for n, p in pm.named_parameters() if p.requires_grad)


def test_target_that_matches_nothing_lists_the_linear_layers(tiny_gpt2):
    model, _ = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    with pytest.raises(ModelError) as e:
        attach_lora(model, LoraConfig(targets=["q_proj"]))
    assert "['q_proj']" in str(e.value) and "c_attn" in str(e.value) and "c_fc" in str(e.value)


@pytest.mark.parametrize(("dtype", "kept"), [("bf16", torch.bfloat16), ("fp16", torch.float32)])
def test_a_quantized_base_keeps_bf16_weights_and_lifts_fp16_ones(tiny_llama, dtype, kept):
    """The weights bitsandbytes does not quantize (embeddings, norms, lm_head) stay in bf16
    (fp32's range; the fused loss then multiplies in bf16), fp16 ones go to fp32 as peft's
    prepare_model_for_kbit_training would; the base is frozen, LoRA is fp32 either way."""
    model, _ = load_base(ModelConfig(name=str(tiny_llama), dtype=dtype, quantization="4bit"))
    pm = attach_lora(model, LoraConfig(r=4))
    base = pm.get_base_model()
    dense = {base.lm_head.weight.dtype, base.model.embed_tokens.weight.dtype,
             base.model.norm.weight.dtype, base.model.layers[0].input_layernorm.weight.dtype}
    assert dense == {kept}
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8
    assert {p.dtype for n, p in pm.named_parameters() if p.requires_grad} == {torch.float32}
    assert all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)


def test_the_fused_losses_multiply_in_the_autocast_dtype(tiny_llama, monkeypatch):
    """An fp32 lm_head with a bias (as on an fp16 4/8-bit base of Phi-2 or GPT-J) under bf16
    autocast: the SFT loss and the preference log-probs get h, weight and bias in bf16 and
    agree with the fp32 computation to bf16's precision."""
    from adapters.kernels import ce, logprobs
    from adapters.training import loss, objectives

    seen = []

    def spy(real):
        def wrapped(h, weight, target, bias=None, chunk=1024):
            seen.append({h.dtype, weight.dtype, bias.dtype})
            return real(h, weight, target, bias, chunk=chunk)
        return wrapped

    monkeypatch.setattr(loss, "linear_cross_entropy_sum", spy(ce.linear_cross_entropy_sum))
    monkeypatch.setattr(objectives, "token_logprobs", spy(logprobs.token_logprobs))
    model, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    model.lm_head = head  # untied, with a bias
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    batch = {"input_ids": ids, "labels": ids, "seq": torch.tensor([[0] * 8, [1] * 8])}

    def both():
        return (loss.batch_loss(model, batch)[0],
                objectives.sequence_logprobs(model, batch)[0])

    exact = both()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = both()
    assert seen == [{torch.float32}] * 2 + [{torch.bfloat16}] * 2
    for a, b in zip(fast, exact, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=0)


def test_the_output_head_as_a_target_is_refused_by_name(tiny_llama):
    """LoRA on the lm_head would never train (the fused loss reads the head's own weight):
    asked for, it is an error that names it, before peft wraps anything."""
    model, _ = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    with pytest.raises(ModelError, match=r"\['lm_head'\] is the output head"):
        attach_lora(model, LoraConfig(targets=["q_proj", "lm_head"]))
