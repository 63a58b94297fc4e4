"""Activation checkpointing whose saved block inputs live in CPU memory (on CUDA).

Plain checkpointing keeps one tensor per decoder block, its input hidden states (B, T, H), on
the device until backward, and recomputes the block from it. At long context those inputs are
what is left of activation memory: here each one is copied to pinned CPU memory (asynchronously,
on CUDA) and brought back only for its block's backward, so the longest trainable sequence
grows. On a CPU the copy would be to itself: the input is kept as it is, and the arithmetic is
that of plain checkpointing (the tests compare the two).

`offload_checkpointing(model)` wraps every decoder block of a (peft-wrapped) causal LM.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_ORIG = "_adapters_block_forward"


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of the decoder (Llama-style `layers`, GPT-2's `h`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise TypeError(f"{type(decoder).__name__}: no list of decoder blocks found")


def _to_host(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cuda":
        return x.detach()
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x.detach(), non_blocking=True)  # ordered on the current stream
    return host


class OffloadedBlock(torch.autograd.Function):
    """`run(hidden)` without saving activations; backward recomputes it from the host copy.

    The block's trainable parameters are passed as inputs only so that the output requires
    grad even when `hidden` does not (the first block's input, from frozen embeddings); their
    gradients are accumulated by the inner backward, as in reentrant checkpointing.
    """

    @staticmethod
    def forward(ctx, run, hidden, *params):
        dev = hidden.device.type
        ctx.run, ctx.device = run, hidden.device
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if dev == "cuda" else None
        ctx.host = _to_host(hidden)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad_out):
        h = ctx.host.to(ctx.device, non_blocking=True).detach()
        h.requires_grad_(ctx.needs_input_grad[1])
        dev = ctx.device.type
        with torch.random.fork_rng(devices=[ctx.device] if dev == "cuda" else []):
            torch.set_rng_state(ctx.rng)  # the same dropout masks as in forward
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            enabled, dtype = ctx.autocast
            amp = (torch.autocast(dev, dtype=dtype) if enabled else contextlib.nullcontext())
            with torch.enable_grad(), amp:
                out = ctx.run(h)
        torch.autograd.backward(out, grad_out)
        ctx.host = ctx.run = None
        n_params = len(ctx.needs_input_grad) - 2
        return (None, h.grad if h.requires_grad else None, *([None] * n_params))


def _wrapped(block: nn.Module, params: list[torch.Tensor]):
    orig = getattr(block, _ORIG)

    def forward(hidden_states, *args, **kwargs):
        if not (torch.is_grad_enabled() and block.training):
            return orig(hidden_states, *args, **kwargs)
        return OffloadedBlock.apply(lambda h: orig(h, *args, **kwargs), hidden_states, *params)

    return forward


def offload_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder block with its input kept on the host; returns how many."""
    blocks = decoder_blocks(model)
    for block in blocks:
        if _ORIG not in block.__dict__:
            setattr(block, _ORIG, block.forward)
            block.forward = _wrapped(block, [p for p in block.parameters() if p.requires_grad])
    return len(blocks)
