"""Attention for training rows on CPU: three matmuls and a softmax with a hand-written backward.

Why: PyTorch's SDPA on CPU runs its flash kernel, which tiles for long rows and skips the
masked half of a causal score matrix; for the short rows much fine-tuning uses it spends more
time on bookkeeping than on arithmetic, and three plain matmuls win. Past a few hundred tokens
the full (T, T) score matrices this path writes cost more than the tiling saves, so
`train.attention: auto` takes this path on CPU for rows up to `MAX_LEN` tokens and SDPA
everywhere else (CUDA, longer rows). `scripts/bench_attention.py` measures both on the default
model's shapes; the figures and the command are in the README.

  forward:   s = (q * scale) k^T, masked       (B, KV, G*T, S); G query heads per kv head
             p = softmax(s)                     accumulated in fp32, kept in the compute dtype
             o = p v                            (B, KV, G*T, D)
  backward:  dv = p^T do;  dp = do v^T
             ds = p * (dp - rowsum(dp * p))     one native pass (softmax's own backward)
             dq = ds k * scale;  dk = ds^T (q * scale)

The G query heads that share a key/value head (grouped-query attention) are stacked along the
rows, so k and v are never repeated and the sums over G happen inside the matmuls. Everything
stays in the compute dtype (bf16 under autocast) with fp32 accumulation inside the matmuls and
the softmax, as SDPA's math path. A mask (the padding or packing mask transformers or our
packer builds, boolean) blocks with the dtype's most negative value, not -inf: a row with
nothing to attend to gets a uniform softmax, no NaN. With no mask (causal alone) the same value
enters as an additive bias inside the score matmul (baddbmm), which saves the masking pass.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

MAX_LEN = 512  # auto: longer rows go to SDPA (scripts/bench_attention.py)
# The cached additive causal bias is (G*T, S) in the compute dtype: up to 8 M elements
# (16 MiB in bf16, e.g. G=8 at T=S=1024); beyond, a (T, S) bool mask is built per call.
_MAX_BIAS_ELEMENTS = 8 << 20
MODES = ("auto", "sdpa", "matmul")
NAME = "adapters_{}"  # the name each mode is registered under in transformers' interfaces


class MatmulAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, blocked, scale: float, groups: int):
        # q (B, KV, G*T, D): the G query heads of each kv head stacked along the rows, so one
        # plain batched matmul per product and the sums over G fall out of the backward's
        # matmuls; k, v (B, KV, S, D); blocked: either bool, broadcastable to
        # (B, KV, G, T, S), True where a query may not see a key, or (causal alone) an
        # additive (G*T, S) bias of 0 and the dtype's most negative value.
        b, kv, gt, d = q.shape
        qs = q * scale  # scaled on the small side, once, as SDPA's math path does
        if blocked.dtype == torch.bool:
            s = torch.matmul(qs, k.transpose(-1, -2))  # (B, KV, G*T, S)
            s.view(b, kv, groups, gt // groups, -1).masked_fill_(blocked,
                                                                  torch.finfo(s.dtype).min)
        else:  # the bias goes in as the matmul's C (beta 1): no masking pass (3x faster)
            s = torch.baddbmm(blocked, qs.reshape(b * kv, gt, d),
                              k.reshape(b * kv, -1, d).transpose(1, 2)).view(b, kv, gt, -1)
        p = torch.softmax(s, dim=-1)  # accumulates in fp32 for bf16 scores
        ctx.save_for_backward(qs, k, v, p)
        ctx.scale = scale
        return torch.matmul(p, v)  # (B, KV, G*T, D)

    @staticmethod
    def backward(ctx, do):
        qs, k, v, p = ctx.saved_tensors
        do = do.to(qs.dtype).contiguous()  # an upcast loss can send an fp32 gradient
        dv = torch.matmul(p.transpose(-1, -2), do)  # (B, KV, S, D), summed over the G heads
        dp = torch.matmul(do, v.transpose(-1, -2))  # (B, KV, G*T, S)
        # p * (dp - rowsum(dp * p)) in one native pass, accumulated in fp32
        ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)
        dq = torch.matmul(ds, k).mul_(ctx.scale)  # (B, KV, G*T, D)
        dk = torch.matmul(ds.transpose(-1, -2), qs)  # (B, KV, S, D)
        return dq, dk, dv, None, None, None


def _causal_blocked(t: int, s: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool: True where query t may not see key j (j > t + S - T)."""
    return torch.ones(t, s, dtype=torch.bool, device=device).triu(diagonal=s - t + 1)


@functools.lru_cache(maxsize=8)
def _causal_bias(groups: int, t: int, s: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """(G*T, S) additive causal mask: the dtype's most negative value where query t may not
    see key j, 0 elsewhere; repeated for the G stacked query heads."""
    bias = torch.zeros(t, s, dtype=dtype, device=device).masked_fill_(
        _causal_blocked(t, s, device), torch.finfo(dtype).min)
    return bias.repeat(groups, 1)


def matmul_attention(query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """(B, T, H, Dv) attention output, as transformers' attention functions return it.

    query (B, H, T, D); key (B, KV, S, D); value (B, KV, S, Dv) (Dv may differ from D, as in
    DeepSeek's attention); attention_mask None (causal, T == S or T == 1) or boolean
    (B | 1, 1, T, S) with True = may attend. Query head h reads kv head h // (H / KV), as
    transformers' repeat_kv pairs them.
    """
    b, h, t, d = query.shape
    kv = key.shape[1]
    q = query.reshape(b, kv, (h // kv) * t, d)
    device = query.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else query.dtype)  # one compute dtype for the op; autocast stays out of it
    if attention_mask is None and t * key.shape[2] * h // kv <= _MAX_BIAS_ELEMENTS:
        blocked = _causal_bias(h // kv, t, key.shape[2], dtype, query.device)  # (G*T, S)
    elif attention_mask is None:  # long rows (forced matmul mode): a small bool mask instead
        blocked = _causal_blocked(t, key.shape[2], query.device)
    else:
        blocked = ~attention_mask[:, :, None]  # (B|1, 1, 1, T, S)
    with torch.autocast(device_type=device, enabled=False):
        out = MatmulAttention.apply(q.to(dtype), key.to(dtype).contiguous(),
                                    value.to(dtype).contiguous(), blocked, scaling,
                                    h // kv)  # (B, KV, G*T, Dv)
    return out.reshape(b, h, t, value.shape[-1]).transpose(1, 2).contiguous()


def usable(mode: str, query, key, attention_mask, dropout: float, kwargs: dict) -> bool:
    """Whether this call takes the matmul path under `mode` (else SDPA)."""
    if mode == "sdpa" or dropout or kwargs.get("softcap") is not None \
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions"):
        return False
    if attention_mask is None and 1 < query.shape[2] != key.shape[2]:
        # no mask and several queries against another number of keys: a prefill into an empty
        # static cache, which SDPA aligns top-left; only square or one-query calls come here
        return False
    if attention_mask is not None and (attention_mask.dim() != 4
                                       or attention_mask.dtype != torch.bool):
        return False  # additive float masks go to SDPA
    if query.shape[1] % key.shape[1]:
        return False
    return mode == "matmul" or (query.device.type == "cpu" and key.shape[2] <= MAX_LEN)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, *,
                      mode: str, **kwargs):
    """A transformers attention function: the matmul path where `usable`, SDPA otherwise."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if causal and usable(mode, query, key, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return matmul_attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def attention_choice(mode: str, device: str) -> str:
    """What `mode` runs on `device`, in words, for the pre-flight line."""
    if mode == "auto":
        return (f"auto (matmul path for rows <= {MAX_LEN} tokens, SDPA above)"
                if torch.device(device).type == "cpu" else "auto (SDPA)")
    return mode


def install_attention(model, mode: str) -> str:
    """Point `model`'s attention at `mode` (auto | sdpa | matmul); returns what it runs now.

    The masks are built as for SDPA (None when causal alone is enough), so everything but the
    attention call itself is transformers' SDPA path. Models whose attention does not go
    through transformers' attention interface keep their own.
    """
    if mode not in MODES:
        raise ValueError(f"attention mode {mode!r}: expected one of {', '.join(MODES)}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mode == "sdpa" or not getattr(base, "_supports_attention_backend", False) \
            or base.config._attn_implementation != "sdpa":
        return base.config._attn_implementation
    name = NAME.format(mode)
    AttentionInterface.register(name, functools.partial(attention_forward, mode=mode))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    base.set_attn_implementation(name)
    return name
