"""The fused LoRA op against peft's own layers: outputs and every gradient (x, A, B), fp32."""

import pytest
import torch
from peft import get_peft_model_state_dict

from adapters.config import LoraConfig, ModelConfig
from adapters.kernels.lora import install_fused_lora, is_fused, uninstall_fused_lora
from adapters.lora import attach_lora, set_adapter_training
from adapters.model import load_base
from adapters.training.loss import batch_loss

TOL = dict(atol=1e-5, rtol=1e-5)


def close(got, ref, msg=""):
    """Equal to 1e-5 of the tensor's own scale (fp32 sums of ~100 terms round at ~1e-6)."""
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got, ref, atol=1e-5 * scale, rtol=1e-5, msg=msg or None)


def _lora_model(path, quantization="none", dropout=0.0, seed=0):
    model, _ = load_base(ModelConfig(name=str(path), dtype="fp32", quantization=quantization))
    pm = attach_lora(model, LoraConfig(r=4, dropout=dropout))
    torch.manual_seed(seed)
    with torch.no_grad():  # non-zero B and a large scale: the adapter path matters
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    set_adapter_training(pm, True)  # base dropout off: the two passes must see the same net
    return pm


def _lora_layers(pm):
    return {n: m for n, m in pm.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer")
            and not isinstance(m.base_layer, torch.nn.ModuleDict)}


# Siblings that the op computes in their group leader's call (Llama's q/k/v, gate/up).
SIBLINGS = ("k_proj", "v_proj", "up_proj")


def _op_calls_per_forward(layers):
    """Fused-op calls one model forward makes: one per projection, one per sibling group."""
    return sum(not n.endswith(SIBLINGS) for n in layers)


def _batch(seed=0, vocab=512, b=2, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _loss_and_grads(pm, batch):
    pm.zero_grad(set_to_none=True)
    emb = pm.get_base_model().get_input_embeddings()
    captured = {}
    # The gradient reaching the embeddings' output checks dx through every fused layer.

    def keep(module, inputs, out):
        out.retain_grad()
        captured["e"] = out

    h = emb.register_forward_hook(keep)
    emb.weight.requires_grad_(True)
    try:
        s, n = batch_loss(pm, batch)
        s.backward()
    finally:
        h.remove()
        emb.weight.requires_grad_(False)
    grads = {k: p.grad.clone() for k, p in pm.named_parameters() if "lora_" in k}
    return s.detach(), grads, captured["e"].grad.clone()


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_model_loss_and_all_gradients_equal_peft(tiny_model, quantization, fused_op_calls):
    pm = _lora_model(tiny_model, quantization)
    batch = _batch()
    ref_loss, ref_grads, ref_dx = _loss_and_grads(pm, batch)
    assert fused_op_calls == {"forward": 0, "backward": 0}  # the reference is peft's alone
    n = install_fused_lora(pm)
    layers = _lora_layers(pm)
    assert n == len(layers) > 0 and all(is_fused(m) for m in layers.values())
    loss, grads, dx = _loss_and_grads(pm, batch)
    # Every LoRA layer went through the op, forward and backward: none fell back to peft.
    want = _op_calls_per_forward(layers)
    assert fused_op_calls == {"forward": want, "backward": want}
    close(loss, ref_loss)
    close(dx, ref_dx)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * len(layers)
    for k in grads:
        assert ref_grads[k].abs().sum() > 0, k
        close(grads[k], ref_grads[k], k)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_each_layer_output_and_gradients_equal_peft(tiny_model, quantization, fused_op_calls):
    pm = _lora_model(tiny_model, quantization)
    for name, layer in _lora_layers(pm).items():
        d = layer.lora_A["default"].weight.shape[1]
        x = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(1))
        dy = None
        results = []
        for fused in (False, True):
            (install_fused_lora if fused else uninstall_fused_lora)(pm)
            before = dict(fused_op_calls)
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            dy = torch.randn_like(y) if dy is None else dy
            pm.zero_grad(set_to_none=True)
            y.backward(dy)
            # The fused pass ran the op once each way (a sibling's call computes its whole
            # group); the reference pass never did.
            ran = {k: fused_op_calls[k] - before[k] for k in before}
            assert ran == {"forward": int(fused), "backward": int(fused)}, (name, fused)
            results.append((y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone(),
                            layer.lora_B["default"].weight.grad.clone()))
        for what, got, ref in zip(("y", "dx", "dA", "dB"), results[1], results[0], strict=True):
            close(got, ref, f"{name} {what}")


def test_grouped_siblings_share_one_call_and_match(tiny_llama, fused_op_calls):
    pm = _lora_model(tiny_llama)
    attn = pm.get_base_model().model.layers[0].self_attn
    x = torch.randn(2, 7, 64)
    ref = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    install_fused_lora(pm)
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(type(m)))
    try:
        got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    finally:
        hook.remove()
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, **TOL)
    # One fused computation: the base Linear and lora_A/B modules were not called at all.
    assert len(calls) == 3 and torch.nn.Linear not in calls
    assert fused_op_calls["forward"] == 1
    # Out of order and with another input, each still gets its own projection, computed
    # afresh by the op (not a stale sibling output, not peft's path).
    y = torch.randn(2, 7, 64)
    torch.testing.assert_close(attn.v_proj(y), _peft(attn.v_proj, y), **TOL)
    assert fused_op_calls["forward"] == 2
    torch.testing.assert_close(attn.q_proj(x), ref[0], **TOL)
    assert fused_op_calls["forward"] == 3


def _peft(layer, x):
    return layer._adapters_peft_forward(x)


def test_state_dict_names_unchanged_and_bf16_close(tiny_model, fused_op_calls):
    pm = _lora_model(tiny_model)
    before = get_peft_model_state_dict(pm)
    batch = _batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = batch_loss(pm, batch)
        install_fused_lora(pm)
        got, _ = batch_loss(pm, batch)
    # Under autocast too, every layer took the op (bf16 compute inside it).
    assert fused_op_calls["forward"] == _op_calls_per_forward(_lora_layers(pm))
    after = get_peft_model_state_dict(pm)
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(got, ref, atol=0.0, rtol=2e-2)


def test_unsupported_states_fall_back_to_peft(tiny_llama, fused_op_calls):
    pm = _lora_model(tiny_llama, dropout=0.1)  # dropout: peft's path, nothing fused
    assert install_fused_lora(pm) == 0
    batch = _batch(2)
    batch_loss(pm, batch)
    assert fused_op_calls["forward"] == 0
    pm = _lora_model(tiny_llama)
    install_fused_lora(pm)
    with pm.disable_adapter():  # disabled adapters: the base alone, as peft computes it
        got, _ = batch_loss(pm, batch)
        assert fused_op_calls["forward"] == 0  # the installed op stood aside
        uninstall_fused_lora(pm)
        ref, _ = batch_loss(pm, batch)
    torch.testing.assert_close(got, ref, **TOL)
    # Enabled again, the same installed layers take the op: the fallback was the state's.
    install_fused_lora(pm)
    batch_loss(pm, batch)
    assert fused_op_calls["forward"] == _op_calls_per_forward(_lora_layers(pm))
