"""Per-token log-probabilities of the labels, chunked: `log softmax(h @ W.T + b)[y]` row by row.

Preference objectives (DPO, ORPO) need each sequence's summed log-probability of its
completion, not one summed loss, so the fused CE of `ce.py` (a scalar) does not serve. This
computes the (N,) log-probs at label positions only, `chunk` rows at a time: a (chunk, V) block
exists at once, never (N, V). Backward recomputes each block (nothing of size V is kept
between forward and backward), so memory stays O(chunk x V) for any N.

`reference_token_logprobs` is the plain computation (full logits) the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ce import rows_per_chunk


def reference_token_logprobs(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target | h) per row: h (N, H), weight (V, H), target (N,). Materialises (N, V)."""
    logits = F.linear(h, weight, bias).float()  # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)


class ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward keeps only (N,) results; backward recomputes each (chunk, V) block of logits."""

    @staticmethod
    def forward(ctx, h, weight, target, bias, chunk: int):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            # log_softmax is one fused row-wise kernel (logsumexp is four passes on CPU)
            logp = torch.log_softmax(F.linear(h[s:s + chunk], weight, bias).float(), dim=-1)
            out[s:s + chunk] = logp.gather(1, target[s:s + chunk, None]).squeeze(1)  # (c,)
        ctx.save_for_backward(h, weight, target, bias if bias is not None else torch.empty(0))
        ctx.has_bias, ctx.chunk = bias is not None, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (N,)
        h, weight, target, bias = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc, tc = h[s:s + ctx.chunk], target[s:s + ctx.chunk]
            # d logp[y] / d logits = onehot(y) - softmax; scaled by each row's incoming grad.
            # exp(log_softmax) in place: faster on CPU than torch.softmax in fp32.
            g = torch.log_softmax(F.linear(hc, weight, bias).float(), dim=-1).exp_().neg_()
            g.scatter_add_(1, tc[:, None], torch.ones_like(tc[:, None], dtype=g.dtype))
            g *= grad_out[s:s + ctx.chunk, None].float()
            if need_h:
                grad_h[s:s + ctx.chunk] = g.to(h.dtype) @ weight.to(h.dtype)  # (c, H)
            if need_w:
                grad_w += g.T @ hc.float()  # (V, H)
            if need_b:
                grad_b += g.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, None,
                grad_b.to(bias.dtype) if need_b else None, None)


def token_logprobs(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                   bias: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """(N,) fp32 log-probabilities of `target` under `h @ weight.T (+ bias)`, chunked.

    h: (N, H) rows at label positions only; weight: (V, H). Differentiable in h, weight, bias.
    """
    if h.shape[0] == 0:
        return h.sum(-1).float() * 0.0  # (0,), still connected to the graph
    # Fewer rows for a large vocabulary: a (chunk, V) fp32 block stays within ce's byte cap.
    return ChunkedTokenLogprobs.apply(h, weight, target, bias,
                                      rows_per_chunk(weight.shape[0], chunk))
