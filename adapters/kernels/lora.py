"""Fused LoRA projections: one autograd op for `y = base(x) + s * (x @ A^T) @ B^T`.

peft's LoRA layer runs the base layer, then `lora_B(lora_A(dropout(x))) * scaling` as three
modules and an add, and autograd saves what each of them wants. Here one custom op per group
of projections that read the same input does the lot and saves only what the hand-derived
backward needs: the input x (N, d), the small (N, k*r) `x @ A^T`, and the adapter weights.

  forward:   xa = x @ A^T                         (N, r)   one matmul for the stacked group
             y  = x @ W^T + bias + s * xa @ B^T   (N, d_out)
  backward:  g  = s * dy @ B                      (N, r)
             dB = s * dy^T @ xa                   (d_out, r)
             dA = g^T @ x                         (r, d)
             dx = dy @ W + g @ A                  (N, d)

Projections that read the same input (Llama's q/k/v, gate/up) form a group: their A matrices
are stacked into one (k*r, d) matmul in forward and in backward, so x is read once. A 4-bit
base is dequantized to the compute dtype once per use (forward, and again in backward rather
than kept). Only the forward of peft's layers is replaced: the parameters, their names and so
the saved adapter folder are exactly peft's.

`install_fused_lora(model)` swaps the forward of every eligible LoRA layer (vanilla LoRA, no
dropout, no DoRA, a dense / GPT-2 Conv1D / bitsandbytes 4-bit base); anything else keeps peft's
forward, and so does any call in a state the op does not cover (adapters disabled or merged,
several active adapters, mixed-adapter batches).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Sibling projections that read the same input tensor, by leaf name.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_ORIG = "_adapters_peft_forward"


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (d_out, d_in) tensor in `dtype`."""
    w = base.weight
    quant_state = getattr(w, "quant_state", None)
    if quant_state is not None:
        # bitsandbytes is only needed when a 4-bit base was loaded with it.
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, quant_state).to(dtype)
    if isinstance(base, Conv1D):  # GPT-2 stores W^T: (d_in, d_out)
        return w.t().to(dtype)
    return w.to(dtype)


def no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class FusedLoraFn(torch.autograd.Function):
    """k projections of one input: (x, *A_i, *B_i) -> k outputs. See the module docstring."""

    @staticmethod
    def forward(ctx, x, bases, scales, *ab):
        # x: (N, d) already in the compute dtype; ab: A_1..A_k (r, d), B_1..B_k (d_i, r).
        k = len(bases)
        As, Bs = ab[:k], ab[k:]
        dt = x.dtype
        with no_autocast(x.device.type):
            a = torch.cat([A.to(dt) for A in As]) if k > 1 else As[0].to(dt)  # (k r, d)
            xa = x @ a.t()  # (N, k r)
            outs, start = [], 0
            for base, B, s in zip(bases, Bs, scales, strict=True):
                r = B.shape[1]
                bias = getattr(base, "bias", None)
                w = dense_weight(base, dt)
                y = x @ w.t() if bias is None else torch.addmm(bias.to(dt), x, w.t())
                y.addmm_(xa[:, start:start + r], B.to(dt).t(), alpha=s)  # (N, d_i)
                outs.append(y)
                start += r
        ctx.bases, ctx.scales = bases, scales
        ctx.save_for_backward(x, xa, *ab)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x, xa, *ab = ctx.saved_tensors
        k = len(ctx.bases)
        As, Bs = ab[:k], ab[k:]
        dt = x.dtype
        need_x = ctx.needs_input_grad[0]
        gs, dBs, dx, start = [], [], None, 0
        with no_autocast(x.device.type):
            for base, B, s, dy in zip(ctx.bases, Bs, ctx.scales, dys, strict=True):
                r = B.shape[1]
                if dy is None:  # an output that was not used
                    gs.append(xa.new_zeros(x.shape[0], r))
                    dBs.append(torch.zeros_like(B))
                    start += r
                    continue
                dy = dy.to(dt).reshape(-1, dy.shape[-1])  # (N, d_i)
                dBs.append((dy.t() @ xa[:, start:start + r]).mul_(s).to(B.dtype))  # (d_i, r)
                gs.append((dy @ B.to(dt)).mul_(s))  # (N, r)
                if need_x:
                    w = dense_weight(base, dt)  # re-dequantized, not kept since forward
                    dx = dy @ w if dx is None else dx.addmm_(dy, w)
                start += r
            g = torch.cat(gs, dim=1) if k > 1 else gs[0]  # (N, k r)
            dA = g.t() @ x  # (k r, d)
            dAs = [part.to(A.dtype) for part, A in zip(dA.split([A.shape[0] for A in As]), As,
                                                       strict=True)]
            if need_x:
                a = torch.cat([A.to(dt) for A in As]) if k > 1 else As[0].to(dt)
                dx = g @ a if dx is None else dx.addmm_(g, a)
        return (dx, None, None, *dAs, *dBs)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def fused_lora(x: torch.Tensor, layers: list[nn.Module],
               name: str | None = None) -> tuple[torch.Tensor, ...]:
    """The outputs of the peft LoRA `layers` (same input x (..., d)), through the fused op,
    with adapter `name` (default: the active one)."""
    name = name or layers[0].active_adapters[0]
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))  # (N, d)
    bases = tuple(m.get_base_layer() for m in layers)
    scales = tuple(float(m.scaling[name]) for m in layers)
    ab = [m.lora_A[name].weight for m in layers] + [m.lora_B[name].weight for m in layers]
    outs = FusedLoraFn.apply(xf, bases, scales, *ab)
    return tuple(y.view(*lead, y.shape[-1]) for y in outs)


def supported(layer: nn.Module) -> bool:
    """Whether the fused op can stand in for this peft LoRA layer's configuration."""
    if not (hasattr(layer, "lora_A") and hasattr(layer, "get_base_layer")):
        return False
    base = layer.get_base_layer()
    w = getattr(base, "weight", None)
    if w is None or w.requires_grad or (getattr(base, "bias", None) is not None
                                        and base.bias.requires_grad):
        return False
    four_bit = getattr(w, "quant_state", None) is not None
    dense = type(base) in (nn.Linear, Conv1D) and w.is_floating_point()
    if not (four_bit or dense):  # e.g. 8-bit bases keep peft's path
        return False
    names = list(layer.lora_A.keys())
    return all(isinstance(layer.lora_dropout[n], nn.Identity)
               and not layer.use_dora.get(n, False)
               and not getattr(layer, "lora_bias", {}).get(n, False)
               and n not in getattr(layer, "lora_variant", {}) for n in names)


def _active_now(layers: list[nn.Module], args, kwargs) -> bool:
    """The plain case the op covers: one active adapter present in every layer, unmerged."""
    if args or kwargs:
        return False
    first = layers[0]
    act = first.active_adapters
    return (len(act) == 1 and all(not m.disable_adapters and not m.merged
                                  and list(m.active_adapters) == act and act[0] in m.lora_A
                                  for m in layers))


class _Group:
    """Projections sharing an input: the first call computes all, the others take theirs.

    The outputs of the siblings are kept until they are asked for with the very same input
    tensor (identity, not value); a call with another input computes afresh.
    """

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self._x: torch.Tensor | None = None
        self._ready: dict[int, torch.Tensor] = {}

    def forward(self, i: int, x, *args, **kwargs):
        if not _active_now(self.layers, args, kwargs):
            self._x, self._ready = None, {}
            return getattr(self.layers[i], _ORIG)(x, *args, **kwargs)
        if self._x is x and i in self._ready:
            y = self._ready.pop(i)
            if not self._ready:
                self._x = None
            return y
        outs = fused_lora(x, self.layers)
        self._x = x if len(outs) > 1 else None
        self._ready = {j: y for j, y in enumerate(outs) if j != i}
        return outs[i]


def _groups(model: nn.Module, group: bool) -> list[list[nn.Module]]:
    """Eligible LoRA layers, siblings reading one input grouped (when `group`)."""
    lora = {n: m for n, m in model.named_modules() if supported(m)}
    taken: set[str] = set()
    out = []
    if group:
        for name in lora:
            parent, _, leaf = name.rpartition(".")
            for members in GROUPS:
                full = [f"{parent}.{m}" if parent else m for m in members]
                if leaf == members[0] and all(f in lora for f in full):
                    out.append([lora[f] for f in full])
                    taken.update(full)
    out += [[m] for n, m in lora.items() if n not in taken]
    return out


def install_fused_lora(model: nn.Module, group: bool = True) -> int:
    """Route eligible peft LoRA layers of `model` through the fused op; returns how many.

    group=False fuses each projection on its own (e.g. where a tracer should not see the
    shared-input bookkeeping). `uninstall_fused_lora` restores peft's forward.
    """
    uninstall_fused_lora(model)
    n = 0
    for layers in _groups(model, group):
        g = _Group(layers)
        for i, m in enumerate(layers):
            setattr(m, _ORIG, m.forward)
            m.forward = functools.partial(g.forward, i)
            n += 1
    return n


def uninstall_fused_lora(model: nn.Module) -> None:
    """Give every layer `install_fused_lora` touched its peft forward back."""
    for m in model.modules():
        if _ORIG in m.__dict__:
            del m.__dict__[_ORIG]
            with contextlib.suppress(KeyError):
                del m.__dict__["forward"]


def is_fused(layer: nn.Module) -> bool:
    return _ORIG in layer.__dict__
