"""The matmul attention path (kernels/attention.py) against PyTorch's SDPA: outputs and every
gradient, grouped-query heads, causal, padding and packed masks; then whole tiny models (loss
and every LoRA gradient in fp32) and the rules that pick the path."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import recipe
from transformers import AutoModelForCausalLM

from adapters.kernels import attention
from adapters.kernels.attention import MAX_LEN, install_attention, matmul_attention, usable
from adapters.training.trainer import micro_batches, setup, step

B, H, KV, T, D = 2, 6, 2, 12, 8


def _masks() -> dict[str, torch.Tensor | None]:
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[1, -4:] = False  # row 1 padded on the right
    doc = torch.tensor([0] * 5 + [1] * 7)  # two packed documents
    return {"causal": None, "padding": causal & keys[:, None, None, :],
            "packed": (causal & (doc[:, None] == doc[None, :]))[None, None]}


@pytest.mark.parametrize("mask", ["causal", "padding", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_output_and_gradients_equal_sdpa(mask, dtype):
    torch.manual_seed(0)
    q0, k0, v0 = (torch.randn(B, n, T, D, dtype=dtype) for n in (H, KV, KV))
    grad = torch.randn(B, T, H, D, dtype=dtype)
    m = _masks()[mask]

    def run(fn):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out = fn(q, k, v)
        out.backward(grad)
        return out, q.grad, k.grad, v.grad

    ours = run(lambda q, k, v: matmul_attention(q, k, v, m, D ** -0.5))
    ref = run(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, is_causal=m is None, enable_gqa=True).transpose(1, 2))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=name)


def test_in_bf16_as_close_to_the_fp64_answer_as_sdpa_is():
    """bf16 scores and probabilities (fp32 accumulation inside): errors of SDPA's own size."""
    torch.manual_seed(0)
    b, h, kv, t, d = 2, 9, 3, 128, 64
    q0, k0, v0 = (torch.randn(b, n, t, d, dtype=torch.float64) for n in (h, kv, kv))
    grad = torch.randn(b, t, h, d, dtype=torch.float64)

    def run(fn, dtype):
        q, k, v = (x.to(dtype, copy=True).requires_grad_() for x in (q0, k0, v0))
        out = fn(q, k, v)
        out.backward(grad.to(dtype))
        return [x.double() for x in (out, q.grad, k.grad, v.grad)]

    sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    exact = run(sdpa, torch.float64)
    ours = run(lambda q, k, v: matmul_attention(q, k, v, None, d ** -0.5), torch.bfloat16)
    theirs = run(sdpa, torch.bfloat16)
    for name, a, r, x in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        err, ref_err = ((y - x).norm() / x.norm() for y in (a, r))
        assert err < 2 * ref_err and err < 1e-2, (name, float(err), float(ref_err))


def test_a_row_with_nothing_to_attend_to_stays_finite():
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[..., 0, :] = False  # query 0 may see nothing (left padding)
    out = matmul_attention(q, k, v, mask, 8 ** -0.5)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_whole_model_loss_and_lora_gradients_equal_sdpa(tiny_model, tmp_path, packed,
                                                        monkeypatch):
    run = setup(recipe(tiny_model, tmp_path, "train.steps=1", f"data.packing={packed}",
                       "train.attention=matmul"))
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at init would leave every lora_A gradient zero
        for n, p in run.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = micro_batches(run, 0)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")
              if k in batch}
    base = run.model.get_base_model()
    calls = []
    forward = attention.MatmulAttention.forward
    monkeypatch.setattr(attention.MatmulAttention, "forward",
                        staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a)))
    results = {}
    for impl in ("adapters_matmul", "sdpa"):
        base.set_attn_implementation(impl)
        run.model.zero_grad(set_to_none=True)
        calls.clear()
        loss = run.model(**inputs).loss
        loss.backward()
        assert len(calls) == (base.config.num_hidden_layers if impl != "sdpa" else 0)
        results[impl] = loss.item(), {n: p.grad.clone() for n, p in run.model.named_parameters()
                                      if p.requires_grad}
    (lm, gm), (ls, gs) = results["adapters_matmul"], results["sdpa"]
    assert lm == pytest.approx(ls, abs=1e-5)
    for n in gs:
        torch.testing.assert_close(gm[n], gs[n], atol=1e-5, rtol=1e-5, msg=n)


def test_auto_takes_the_matmul_path_on_cpu_for_short_rows_only():
    q, k = torch.zeros(1, 4, 8, 2), torch.zeros(1, 2, 8, 2)
    assert usable("auto", q, k, None, 0.0, {})
    assert usable("matmul", q, k, None, 0.0, {})
    assert not usable("sdpa", q, k, None, 0.0, {})
    assert not usable("auto", q, k, None, 0.1, {})  # attention dropout: SDPA
    assert not usable("auto", q, k, None, 0.0, {"softcap": 30.0})
    long_q, long_k = torch.zeros(1, 4, MAX_LEN + 1, 2), torch.zeros(1, 2, MAX_LEN + 1, 2)
    assert not usable("auto", long_q, long_k, None, 0.0, {})
    assert usable("matmul", long_q, long_k, None, 0.0, {})


def test_preflight_line_names_the_attention_path(tiny_llama, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="adapters"):
        run = setup(recipe(tiny_llama, tmp_path, "train.steps=1"))
    line = next(r.getMessage() for r in caplog.records if "pre-flight" in r.getMessage())
    assert f"attention auto (matmul path for rows <= {MAX_LEN} tokens, SDPA above)" in line
    assert run.model.get_base_model().config._attn_implementation == "adapters_auto"
    with pytest.raises(ValueError, match="attention mode 'fast'"):
        install_attention(run.model, "fast")


def test_a_4bit_bf16_base_trains_through_the_matmul_path(tiny_llama, tmp_path):
    """bf16 compute with an fp32 loss sends an fp32 gradient into the op: it must cope."""
    run = setup(recipe(tiny_llama, tmp_path, "train.steps=1", "model.quantization=4bit",
                       "model.dtype=bf16", "train.attention=matmul"))
    assert run.model.get_base_model().config._attn_implementation == "adapters_matmul"
    m = step(run)
    assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0


def test_a_value_head_size_other_than_the_query_s():
    """DeepSeek-style attention: q/k heads of 12, v heads of 8."""
    torch.manual_seed(0)
    q0, k0 = torch.randn(1, 4, 6, 12), torch.randn(1, 2, 6, 12)
    v0 = torch.randn(1, 2, 6, 8)
    grad = torch.randn(1, 6, 4, 8)

    def run(fn):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out = fn(q, k, v)
        out.backward(grad)
        return out, q.grad, k.grad, v.grad

    ours = run(lambda q, k, v: matmul_attention(q, k, v, None, 12 ** -0.5))
    ref = run(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6, msg=name)


def test_a_prefill_into_a_static_cache_goes_to_sdpa(tiny_llama):
    """No mask, several queries, more key slots (an empty static cache): SDPA aligns that
    top-left, so the matmul path declines it, and generation with the installed path gives
    SDPA's tokens."""
    q, k = torch.zeros(1, 4, 5, 2), torch.zeros(1, 2, 32, 2)
    assert not usable("matmul", q, k, None, 0.0, {})
    assert usable("matmul", q[:, :, :1], k, None, 0.0, {})  # one query sees every key
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    want = model.generate(ids, **kw)
    install_attention(model, "matmul")
    assert model.config._attn_implementation == "adapters_matmul"
    assert torch.equal(model.generate(ids, **kw), want)


def test_long_causal_rows_use_a_bool_mask_with_the_same_result(monkeypatch):
    """Past the cached bias's size bound the causal mask is a (T, S) bool built per call:
    the same outputs and gradients as the bias path and as SDPA."""
    torch.manual_seed(0)
    q0, k0, v0 = (torch.randn(B, n, T, D, dtype=torch.float64) for n in (H, KV, KV))
    grad = torch.randn(B, T, H, D, dtype=torch.float64)

    def run():
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out = matmul_attention(q, k, v, None, D ** -0.5)
        out.backward(grad)
        return out, q.grad, k.grad, v.grad

    bias = run()
    monkeypatch.setattr(attention, "_MAX_BIAS_ELEMENTS", 0)
    calls = lambda: sum(attention._causal_bias.cache_info()[:2])  # noqa: E731  hits + misses
    before = calls()
    bool_mask = run()
    assert calls() == before  # the bias was not asked for
    for a, b in zip(bool_mask, bias, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
