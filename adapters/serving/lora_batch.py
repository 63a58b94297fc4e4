"""Batched LoRA for mixed-adapter batches: two batched matmuls per layer, whatever the mix.

peft's mixed-batch path loops over the distinct adapters in a batch at every LoRA layer
(select rows, two small matmuls, scatter back), and loading an adapter through peft rebuilds
its layers (~1 s on the default model). Here every adapter's A and B are written once, straight
from its file, into per-layer stacks with one slot per adapter (ranks zero-padded to the
largest, the scale folded into B, slot 0 all zeros for the plain base); each row gathers its
own pair and `torch.bmm` does all rows at once: the idea of Punica's BGMV / S-LoRA, in plain
torch. A forward hook on each adapted base layer adds the term, so quantized base layers (and
layers peft wrapped for an adapter served its own way) work unchanged.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

# peft's key for a LoRA tensor: <prefix>base_model.model.<module>.lora_A.weight
LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# Fields of adapter_config.json this path does not compute (peft serves those adapters)...
UNSUPPORTED = ("use_dora", "modules_to_save", "alpha_pattern", "lora_bias",
               "trainable_token_indices", "layer_replication")
# ... and those peft's mixed batches do not compute either (refused by the registry): DoRA
# ("Cannot pass adapter_names when DoRA is enabled"), replicated layers (they would change
# the layer stack of every row in the batch).
REFUSED = ("use_dora", "layer_replication")


def batchable(config: dict) -> bool:
    """False for what the batched path does not compute (DoRA, saved whole modules, alpha
    patterns, LoRA biases, ...): the registry loads those adapters through peft."""
    return not any(config.get(k) for k in UNSUPPORTED) and config.get("bias", "none") == "none"


def pairs(tensors: dict[str, torch.Tensor], model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A (r, in), B (out, r))} from a peft state dict; ValueError naming the tensor
    that does not fit the base."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = LORA_KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{key}: not a LoRA tensor of a linear layer")
        found.setdefault(m["module"], {})[m["part"]] = t
    out = {}
    for module, p in found.items():
        try:
            layer = base_layer(model, module)
        except AttributeError:
            raise ValueError(f"{module}: the base has no such layer") from None
        a, b = p.get("A"), p.get("B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{module}: lora_A and lora_B do not pair up")
        want = _in_out(layer)
        if (a.shape[1], b.shape[0]) != want:
            raise ValueError(f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do "
                             f"not fit a layer of {want[0]} inputs and {want[1]} outputs")
        out[module] = (a, b)
    if not out:
        raise ValueError("no LoRA tensors")
    return out


def scale(config: dict, r: int) -> float:
    alpha = config.get("lora_alpha") or r
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def base_layer(model, module: str) -> nn.Module:
    """The base layer at `module` (inside peft's wrapper when peft adapted it too)."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = root.get_submodule(module)
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def _in_out(layer: nn.Module) -> tuple[int, int]:
    if hasattr(layer, "in_features"):  # nn.Linear and bitsandbytes' layers
        return layer.in_features, layer.out_features
    if hasattr(layer, "nf"):  # transformers' Conv1D (GPT-2): weight (in, out)
        return layer.weight.shape[0], layer.nf
    return (-1, -1)


class _Layer:
    """One base layer's stacks: A (S, r, in) and scaled B (S, out, r), S = capacity + 1."""

    def __init__(self, slots: int, r: int, n_in: int, n_out: int, dtype, device):
        self.a = torch.zeros(slots, r, n_in, dtype=dtype, device=device)
        self.b = torch.zeros(slots, n_out, r, dtype=dtype, device=device)
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None  # gathered for `version`
        self.version = -1
        self.used: set[int] = set()
        self.ranks: dict[int, int] = {}  # slot -> its adapter's rank here

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        r = a.shape[0]
        self.ranks[slot] = r
        if r > self.a.shape[1]:  # a larger rank than any before: widen (zero-padded)
            grow = r - self.a.shape[1]
            self.a = torch.cat([self.a, self.a.new_zeros(self.a.shape[0], grow,
                                                         self.a.shape[2])], 1)
            self.b = torch.cat([self.b, self.b.new_zeros(*self.b.shape[:2], grow)], 2)
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :r] = a
        self.b[slot, :, :r] = b
        self.used.add(slot)
        self.version = -1

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.used.discard(slot)
        self.ranks.pop(slot, None)
        self.version = -1
        # Narrow the stacks back to the largest rank still loaded: one high-rank adapter, once
        # unloaded (or a load that failed half-way), leaves no lasting cost on every forward.
        r = max(self.ranks.values(), default=1)
        if r < self.a.shape[1]:
            self.a = self.a[:, :r].contiguous()
            self.b = self.b[:, :, :r].contiguous()


class Slots:
    """Every loaded plain-LoRA adapter, stacked per adapted base layer, one slot each."""

    def __init__(self, model, capacity: int):
        self.model, self.capacity = model, capacity
        self.layers: dict[str, _Layer] = {}
        self.free = list(range(1, capacity + 1))
        self._idx: torch.Tensor | None = None  # (B,) slot per row of the running forward
        self._last: list[int] = []
        self._cur: torch.Tensor | None = None
        self._version = 0
        self._handles = []

    def add(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict) -> int:
        """Write an adapter's pairs ({module: (A, B)}) into a free slot; return the slot."""
        slot = self.free.pop(0)
        try:
            for module, (a, b) in pairs.items():
                layer = self.layers.get(module)
                if layer is None:
                    layer = self._new_layer(module, a)
                layer.write(slot, a.to(layer.a.dtype), b.to(layer.b.dtype) * scale(
                    config, a.shape[0]))
        except BaseException:
            self.remove(slot)
            raise
        return slot

    def remove(self, slot: int) -> None:
        for layer in self.layers.values():
            if slot in layer.used:
                layer.clear(slot)
        self.free.append(slot)
        self.free.sort()

    def _new_layer(self, module: str, a: torch.Tensor) -> _Layer:
        base = base_layer(self.model, module)
        n_in, n_out = _in_out(base)
        device = next(base.parameters()).device
        # fp32 like peft's adapter weights: the LoRA term keeps its precision on a bf16 base
        layer = _Layer(self.capacity + 1, a.shape[0], n_in, n_out, torch.float32, device)
        self.layers[module] = layer
        self._handles.append(base.register_forward_hook(self._hook(layer)))
        return layer

    def _hook(self, layer: _Layer):
        def hook(module, args, out):
            idx = self._idx
            if idx is None or not layer.used:
                return out
            if layer.version != self._version:  # gather each row's pair once per batch
                layer.rows = (layer.a[idx].transpose(1, 2), layer.b[idx].transpose(1, 2))
                layer.version = self._version
            a_rows, b_rows = layer.rows  # (B, in, r), (B, r, out)
            x = args[0]  # (B, T, in)
            delta = torch.bmm(torch.bmm(x.to(a_rows.dtype), a_rows), b_rows)  # (B, T, out)
            return out + delta.to(out.dtype)
        return hook

    @contextmanager
    def rows(self, slots: list[int]):
        """Inside: a forward applies the adapter in slots[i] to batch row i (0 = the base)."""
        if slots != self._last:  # rows joined or left: gather each layer's pairs anew
            device = next(self.model.parameters()).device
            self._cur = torch.tensor(slots, device=device) if any(slots) else None
            self._last, self._version = list(slots), self._version + 1
        self._idx = self._cur
        try:
            yield
        finally:
            self._idx = None
