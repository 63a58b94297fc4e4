"""LoRA per row group: one forward through a shared base, each row group with its own adapter.

Training several adapters on one frozen base (training/jobs.py) stacks the jobs' micro-batches
along the batch dimension and runs the decoder once. Every LoRA layer then computes

    y = x @ W^T (+ bias)                          the base, once for all rows
    y[rows_j] += s_j * dropout_j(x[rows_j]) @ A_j^T @ B_j^T   for each job j

i.e. peft's forward for adapter j, restricted to job j's rows (a job whose targets leave this
layer out gets the base alone). With the fused op installed (kernels/lora.py) and a layer it
supports, each job's rows go through `fused_lora` instead: base and LoRA in one autograd op,
so a job's rows cost what they cost in a run of their own. Different ranks need no padding:
the groups are separate matmuls. Only `RowGroups.set(...)` switches a model into this mode;
outside it (evaluation of one job, the adapter-off reference, saving) a layer does what
`RowGroups.only` says or falls back to the forward it had.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .lora import fused_lora, is_fused, supported

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


def _lora_rows(layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Layer output (N, d_out) for rows x (N, d) under adapter `name` (peft's arithmetic)."""
    if name not in layer.lora_A:
        return layer.get_base_layer()(x)
    if is_fused(layer) and supported(layer):
        return fused_lora(x, [layer], name)[0]
    y = layer.get_base_layer()(x)
    a, b = layer.lora_A[name], layer.lora_B[name]
    # peft casts the input to the adapter's dtype unless autocast does the matmuls
    xa = x if torch.is_autocast_enabled(x.device.type) else x.to(a.weight.dtype)
    return y + b(a(layer.lora_dropout[name](xa))) * layer.scaling[name]


def _forward(layer: nn.Module, rows: RowGroups, x: torch.Tensor, *args, **kwargs):
    if layer.disable_adapters:  # e.g. DPO's reference: the base alone, peft's way
        return getattr(layer, _PREV)(x, *args, **kwargs)
    if rows.only is not None and not args and not kwargs:
        lead = x.shape[:-1]
        y = _lora_rows(layer, rows.only, x.reshape(-1, x.shape[-1]))
        return y.view(*lead, y.shape[-1])
    if rows.groups is None or args or kwargs:
        return getattr(layer, _PREV)(x, *args, **kwargs)
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1])  # (N, d): the stacked jobs' rows
    assert rows.groups[-1][2] == xf.shape[0], "row groups must cover the batch"
    outs = [_lora_rows(layer, name, xf[start:end]) for name, start, end in rows.groups]
    y = torch.cat(outs) if len(outs) > 1 else outs[0]  # (N, d_out)
    return y.view(*lead, y.shape[-1])


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")
            and len(m.lora_A)]


def install_row_groups(model: nn.Module, rows: RowGroups) -> int:
    """Route every LoRA layer of `model` through `rows`; returns how many layers.

    Call it after the fused op is installed (it wraps whatever forward a layer has then).
    DoRA and LoRA bias are refused by the caller: their per-row arithmetic is not here.
    """
    n = 0
    for m in lora_layers(model):
        if _PREV in m.__dict__:
            continue
        setattr(m, _PREV, m.forward)
        m.forward = functools.partial(_forward, m, rows)
        n += 1
    return n
