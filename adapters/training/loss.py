"""The causal-LM loss on label positions only, shared by training and evaluation.

The decoder runs to its last hidden state; the lm_head and cross-entropy are fused and only
applied at positions whose next-token label counts, so full-vocabulary logits never exist.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..config import IGNORE_INDEX
from ..kernels.ce import linear_cross_entropy_sum


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def autocast_for(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def batch_loss(model, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of counted tokens) for one batch; differentiable.

    batch: input_ids (B, T), labels (B, T) aligned with input_ids (HF convention: the model
    predicts labels[t + 1] from position t), attention_mask (B, T) or (B, 1, T, T), and
    position_ids (B, T) when packed.
    """
    base = _base(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    keep = labels != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # (N, H): only positions that predict a counted token
    target = labels[keep]  # (N,)
    h, weight, bias = head_inputs(h, base.get_output_embeddings())
    with torch.autocast(device_type=h.device.type, enabled=False):
        total = linear_cross_entropy_sum(h, weight, target, bias, chunk=chunk)
    return total, int(target.numel())


def head_inputs(h: torch.Tensor, head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(h, weight, bias) of the lm_head in one dtype for the fused ops, which run outside
    autocast: under autocast its compute dtype (an fp32 lm_head next to fp16 compute too, as
    on an fp16 4/8-bit base: the head's matmuls are most of the loss's time), else the
    weight's."""
    weight, bias = head.weight, getattr(head, "bias", None)
    dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(
        h.device.type) else weight.dtype
    return h.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


@torch.no_grad()
def mean_loss(model, batches, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over an iterable of batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with autocast_for(device, dtype):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            s, n = batch_loss(model, batch)
            total += float(s)
            count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
