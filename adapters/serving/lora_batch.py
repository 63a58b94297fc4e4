"""Batched LoRA for mixed-adapter batches: two batched matmuls per layer, whatever the mix.

peft's mixed-batch path loops over the distinct adapters in a batch at every LoRA layer
(select rows, two small matmuls, scatter back), so eight adapters cost eight times the
launches of one. Here every adapter's A and B are stacked once per layer (ranks zero-padded
to the largest, the scale folded into B, slot 0 all zeros for the plain base), each row
gathers its own pair, and `torch.bmm` does all rows at once: the idea of Punica's BGMV /
S-LoRA, in plain torch. The peft layers run with their adapters disabled (base output only)
and a forward hook adds the batched LoRA term, so quantized base layers work unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def supported(model, names: list[str]) -> bool:
    """False when an adapter uses something the batched path does not compute (DoRA, ...)."""
    for _, m in lora_layers(model):
        for n in names:
            if m.use_dora.get(n) or n in getattr(m, "lora_embedding_A", {}):
                return False
            if getattr(m, "lora_bias", {}).get(n):
                return False
    return True


class Stacks:
    """Per LoRA layer: A (S, r, in) and scaled B (S, out, r) for slots [base, *names]."""

    def __init__(self, model, names: list[str]):
        self.names = list(names)
        self.slot = {n: i + 1 for i, n in enumerate(self.names)}
        self.per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for _, m in lora_layers(model):
            present = [n for n in self.names if n in m.lora_A]
            if not present:
                continue
            ref_a = m.lora_A[present[0]].weight  # (r, in)
            ref_b = m.lora_B[present[0]].weight  # (out, r)
            r = max(m.lora_A[n].weight.shape[0] for n in present)
            s = len(self.names) + 1
            a = ref_a.new_zeros(s, r, ref_a.shape[1])  # (S, r, in)
            b = ref_b.new_zeros(s, ref_b.shape[0], r)  # (S, out, r)
            for n in present:
                k = m.lora_A[n].weight.shape[0]
                a[self.slot[n], :k] = m.lora_A[n].weight
                b[self.slot[n], :, :k] = m.lora_B[n].weight * m.scaling[n]
            self.per_layer[id(m)] = (a, b)

    def index(self, adapters: list[str | None], device) -> torch.Tensor:
        return torch.tensor([self.slot[a] if a else 0 for a in adapters], device=device)


@contextmanager
def batched(model, stacks: Stacks, adapters: list[str | None]):
    """Inside: `model(...)` applies adapters[i] to batch row i (None = base)."""
    idx = None
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, out):
        a, b = stacks.per_layer[id(module)]
        if id(module) not in cache:  # gather each row's pair once per decode, not per step
            cache[id(module)] = (a[idx].transpose(1, 2), b[idx].transpose(1, 2))
        a_rows, b_rows = cache[id(module)]  # (B, in, r), (B, r, out)
        x = args[0]  # (B, T, in)
        delta = torch.bmm(torch.bmm(x.to(a_rows.dtype), a_rows), b_rows)  # (B, T, out)
        return out + delta.to(out.dtype)

    layers = [m for _, m in lora_layers(model) if id(m) in stacks.per_layer]
    device = next(model.parameters()).device
    idx = stacks.index(adapters, device)
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with model.disable_adapter():
            yield
    finally:
        for h in handles:
            h.remove()
