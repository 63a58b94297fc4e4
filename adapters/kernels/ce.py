"""Fused linear + cross-entropy: the loss without materialising full-vocabulary logits.

A causal LM's last step, `logits = h @ W.T; loss = CE(logits, y)`, builds an (N, V) tensor
(V ~ 50k): for 4 x 256 tokens that is 200 MB in fp32, plus as much again for its gradient.
Here the loss is computed in chunks of rows, and only at positions whose label counts.

`linear_cross_entropy_sum` uses `torch.nn.functional.linear_cross_entropy` with chunking
where the installed torch has it, and `ChunkedLinearCE` (below) otherwise. `reference_sum`
is the plain two-step computation the tests compare both against.

Memory: a chunk holds at most `rows_per_chunk(V)` rows of vocabulary-wide values, so that its
fp32 logits stay within `MAX_CHUNK_BYTES` whatever the batch (64 rows for a 128k vocabulary),
and the softmax is the exponential of log_softmax's output, taken in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(
    torch.nn, "LinearCrossEntropyOptions")
MAX_CHUNK_BYTES = 32 << 20  # one fp32 (chunk, V) block: 32 MiB (170 rows of a 49k vocabulary)


def rows_per_chunk(vocab: int, chunk: int = 1024, max_bytes: int = MAX_CHUNK_BYTES) -> int:
    """Rows per chunk: at most `chunk`, and few enough that (rows, vocab) fp32 fits max_bytes."""
    return max(1, min(chunk, max_bytes // (4 * max(vocab, 1))))


def reference_sum(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of CE over rows: h (N, H), weight (V, H), target (N,). Materialises (N, V)."""
    logits = F.linear(h, weight, bias).float()  # (N, V)
    return F.cross_entropy(logits, target, reduction="sum")


class ChunkedLinearCE(torch.autograd.Function):
    """Chunked forward that also computes the input/weight gradients, so backward is a scale.

    Peak extra memory is three (chunk, V) blocks (logits in h's dtype, reused for the
    gradient; fp32 logits; fp32 log-probabilities) instead of (N, V). They are allocated once
    and reused by every chunk: fresh 32 MiB tensors per chunk cost page faults that measured
    more than the softmax itself on CPU. Gradients are computed in forward (the Liger-kernel
    approach) because the loss is a scalar: backward only multiplies them by the incoming
    gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, target, bias, chunk: int):
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows, vocab = min(chunk, h.shape[0]), weight.shape[0]
        logits_buf = h.new_empty(rows, vocab)  # (c, V) h's dtype; later the chunk's gradient
        f32 = torch.float32
        float_buf = (None if h.dtype == f32
                     else torch.empty(rows, vocab, dtype=f32, device=h.device))
        logp_buf = torch.empty(rows, vocab, dtype=f32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], target[s:s + chunk]  # (c, H), (c,)
            n = hc.shape[0]
            logits = logits_buf[:n]
            if bias is None:
                torch.mm(hc, weight.t(), out=logits)
            else:
                torch.addmm(bias, hc, weight.t(), out=logits)
            wide = logits if float_buf is None else float_buf[:n].copy_(logits)  # (c, V) fp32
            # One fused row-wise kernel (log_softmax) instead of logsumexp's four passes and a
            # subtraction: 6 ms instead of 30 ms per 170 x 49152 chunk on a 2-core CPU.
            logp = torch.log_softmax(wide, dim=-1, out=logp_buf[:n])  # (c, V)
            total -= logp.gather(1, tc[:, None]).sum()
            # d loss / d logits = softmax - onehot, computed in log_softmax's buffer
            probs = logp.exp_()
            probs.scatter_add_(1, tc[:, None], -torch.ones_like(tc[:, None], dtype=probs.dtype))
            if grad_h is not None:
                g = logits.copy_(probs)  # (c, V) in h's dtype; the logits are done with
                torch.mm(g, weight, out=grad_h[s:s + n])  # (c, H)
            if need_w:
                grad_w.addmm_(probs.T, hc.float())  # (V, H)
            if need_b:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if need_w else torch.empty(0),
                              grad_b if need_b else torch.empty(0))
        ctx.flags = (grad_h is not None, need_w, need_b)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        has_h, has_w, has_b = ctx.flags
        return (gh * grad_out.to(gh.dtype) if has_h else None,
                (gw * grad_out).to(ctx.w_dtype) if has_w else None,
                None, gb * grad_out if has_b else None, None)


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             bias: torch.Tensor | None = None, chunk: int = 1024,
                             use_torch: bool | None = None) -> torch.Tensor:
    """Sum of cross-entropy of `h @ weight.T (+ bias)` against `target`, chunked.

    h: (N, H) rows that count (already filtered of ignored labels); weight: (V, H).
    Returns a scalar fp32 tensor; the caller divides by the number of counted tokens.
    """
    if h.shape[0] == 0:
        return h.sum() * 0.0  # keeps the graph connected so backward still runs
    chunk = rows_per_chunk(weight.shape[0], chunk)
    if use_torch is None:
        # On CPU ours measured faster (0.66 s vs 0.92 s for 1008 x 576 -> 49152 in bf16,
        # forward + backward, torch 2.13); on CUDA prefer torch's op where it exists.
        use_torch = _HAS_TORCH_LCE and h.device.type == "cuda"
    if use_torch:
        opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
        return F.linear_cross_entropy(h, weight, target, linear_bias=bias, reduction="sum",
                                      options=opts).float()
    return ChunkedLinearCE.apply(h, weight, target, bias, chunk)
