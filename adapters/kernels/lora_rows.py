"""LoRA per row group: one forward through a shared base, each row group with its own adapter.

Training several adapters on one frozen base (training/jobs.py) stacks the jobs' micro-batches
along the batch dimension and runs the decoder once. Every LoRA layer then computes

    y = x @ W^T (+ bias)                                   the base: one matmul, all rows
    y[rows_j] += s_j * (x[rows_j] @ A_j^T) @ B_j^T         each job j on its rows only

i.e. peft's forward for adapter j restricted to job j's rows; a job whose targets leave this
layer out gets the base alone. Where the fused op covers the layer (kernels/lora.py:
`supported`), `RowLoraFn` does this as one autograd op with the hand-derived backward

    g_j  = s_j * dy_j @ B_j          (n_j, r_j)
    dB_j = s_j * dy_j^T @ xa_j       (d_out, r_j)
    dA_j = g_j^T @ x_j               (r_j, d)
    dx   = dy @ W  (all rows)  +  g_j @ A_j  (on rows_j)

saving only x and each job's small x_j @ A_j^T. Different ranks need no padding: each group is
its own pair of thin matmuls. Elsewhere (dropout, DoRA, an 8-bit base) peft's modules (DoRA:
peft's own variant code) run per group after one base call. Only `RowGroups.set(...)` switches
a model into this mode; outside it (`only`: one job's evaluation; neither: the adapter-off
reference, saving) a layer does what `only` says or falls back to the forward it had.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .lora import compute_dtype, dense_weight, fused_lora, is_fused, no_autocast, supported

_PREV = "_adapters_rows_prev_forward"


class RowGroups:
    """Which adapter each row range of the current forward belongs to.

    groups: [(adapter name, first row, end row)] over the flattened (B * T) rows, in order and
    covering every row; only: one adapter for every row (a job's evaluation). Neither set: the
    layers behave as before `install_row_groups`.
    """

    def __init__(self):
        self.groups: list[tuple[str, int, int]] | None = None
        self.only: str | None = None

    @contextlib.contextmanager
    def set(self, groups: list[tuple[str, int, int]] | None = None, only: str | None = None):
        prev = self.groups, self.only
        self.groups, self.only = groups, only
        try:
            yield self
        finally:
            self.groups, self.only = prev


class RowLoraFn(torch.autograd.Function):
    """(x (N, d), base, spans, scales, *A_j, *B_j) -> y (N, d_out); see the module docstring."""

    @staticmethod
    def forward(ctx, x, base, spans, scales, *ab):
        k = len(spans)
        As, Bs = ab[:k], ab[k:]
        dt = x.dtype
        with no_autocast(x.device.type):
            w = dense_weight(base, dt)
            bias = getattr(base, "bias", None)
            y = x @ w.t() if bias is None else torch.addmm(bias.to(dt), x, w.t())  # (N, d_out)
            xas = []
            for (s, e), A, B, sc in zip(spans, As, Bs, scales, strict=True):
                xa = x[s:e] @ A.to(dt).t()  # (n_j, r_j)
                y[s:e].addmm_(xa, B.to(dt).t(), alpha=sc)
                xas.append(xa)
        ctx.base, ctx.spans, ctx.scales = base, spans, scales
        ctx.save_for_backward(x, *xas, *ab)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, *rest = ctx.saved_tensors
        k = len(ctx.spans)
        xas, As, Bs = rest[:k], rest[k:2 * k], rest[2 * k:]
        dt = x.dtype
        dy = dy.to(dt)
        dAs, dBs = [], []
        with no_autocast(x.device.type):
            need_x = ctx.needs_input_grad[0]
            dx = dy @ dense_weight(ctx.base, dt) if need_x else None  # (N, d): all rows
            for (s, e), xa, A, B, sc in zip(ctx.spans, xas, As, Bs, ctx.scales, strict=True):
                dyj = dy[s:e]  # (n_j, d_out)
                dBs.append((dyj.t() @ xa).mul_(sc).to(B.dtype))  # (d_out, r_j)
                g = (dyj @ B.to(dt)).mul_(sc)  # (n_j, r_j)
                dAs.append((g.t() @ x[s:e]).to(A.dtype))  # (r_j, d)
                if need_x:
                    dx[s:e].addmm_(g, A.to(dt))
        return (dx, None, None, None, *dAs, *dBs)


def _fused_rows(layer: nn.Module, groups, xf: torch.Tensor) -> torch.Tensor:
    """The layer on stacked rows xf (N, d) through RowLoraFn: the groups with its adapter."""
    mine = [(n, s, e) for n, s, e in groups if n in layer.lora_A and e > s]
    spans = tuple((s, e) for _, s, e in mine)
    scales = tuple(float(layer.scaling[n]) for n, _, _ in mine)
    ab = [layer.lora_A[n].weight for n, _, _ in mine] + [layer.lora_B[n].weight
                                                         for n, _, _ in mine]
    return RowLoraFn.apply(xf.to(compute_dtype(xf)), layer.get_base_layer(), spans, scales,
                           *ab)


def _peft_rows(layer: nn.Module, groups, xf: torch.Tensor) -> torch.Tensor:
    """peft's arithmetic per group (dropout, DoRA, 8-bit bases): one base call, then each
    job's term on its rows, exactly as peft's layer adds it for one active adapter."""
    y = layer.get_base_layer()(xf)  # (N, d_out)
    variants = getattr(layer, "lora_variant", {})
    parts = []
    for name, s, e in groups:
        out = y[s:e]
        if name in layer.lora_A:
            a, b = layer.lora_A[name], layer.lora_B[name]
            # as peft's layer: the input in the adapter's dtype, unless the run turned that
            # cast off (training/jobs.py under autocast, where autocast picks the matmul dtype)
            cast = getattr(layer, "cast_input_dtype_enabled", True)
            x = xf[s:e].to(a.weight.dtype) if cast else xf[s:e]
            if name in variants:  # DoRA: peft's own variant code, on these rows
                out = variants[name].forward(layer, active_adapter=name, x=x, result=out)
            else:
                out = out + b(a(layer.lora_dropout[name](x))) * layer.scaling[name]
        parts.append(out.to(y.dtype))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _forward(layer: nn.Module, rows: RowGroups, x: torch.Tensor, *args, **kwargs):
    if layer.disable_adapters or args or kwargs or (rows.groups is None and rows.only is None):
        # e.g. DPO's reference (adapters off): the forward the layer had, peft's way
        return getattr(layer, _PREV)(x, *args, **kwargs)
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1])  # (N, d): the stacked jobs' rows
    groups = rows.groups or [(rows.only, 0, xf.shape[0])]
    assert groups[-1][2] == xf.shape[0], "row groups must cover the batch"
    if is_fused(layer) and supported(layer):
        y = _fused_rows(layer, groups, xf) if len(groups) > 1 else (
            fused_lora(xf, [layer], groups[0][0])[0] if groups[0][0] in layer.lora_A
            else layer.get_base_layer()(xf))
    else:
        y = _peft_rows(layer, groups, xf)
    return y.view(*lead, y.shape[-1])


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")
            and len(m.lora_A)]


def install_row_groups(model: nn.Module, rows: RowGroups) -> int:
    """Route every LoRA layer of `model` through `rows`; returns how many layers.

    Call it after the fused op is installed (it wraps whatever forward a layer has then).
    LoRA bias is refused by the caller (peft's lora_bias has no per-row arithmetic here).
    """
    n = 0
    for m in lora_layers(model):
        if _PREV in m.__dict__:
            continue
        setattr(m, _PREV, m.forward)
        m.forward = functools.partial(_forward, m, rows)
        n += 1
    return n
