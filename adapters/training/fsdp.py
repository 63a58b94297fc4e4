"""Sharded data parallel (`train.parallel: fsdp`): the frozen base split across ranks (FSDP2).

For bases that do not fit one device. PyTorch's own `fully_shard` wraps each decoder block,
then the decoder (embeddings, final norm) as the root: each rank keeps 1/N of those weights
and all-gathers a block's full weights just before the block runs (forward, and again in
backward), freeing them after. With activation checkpointing the recompute gathers again.

What is not sharded, and why:
  * the LoRA tensors: replicated, as under `ddp`. They are ~0.1-1% of the base; replicated,
    their gradients are summed by `distributed.sum_grads` once per optimiser step (sharded,
    FSDP would reduce-scatter after every micro-batch of grad_accum), the optimiser state and
    the checkpoint are the same files as under `ddp`, and rank 0 writes the adapter from its
    own copy: nothing of the base is ever gathered for saving.
  * the lm_head: the fused loss reads `lm_head.weight` directly (no module forward that
    FSDP could hook to gather it), so it stays whole on every rank; a tied head (GPT-2) keeps
    the tied embedding whole too.
4-bit bases: bitsandbytes' packed weights shard like any tensor (all parameters of a block
have one dtype when `bnb_4bit_quant_storage` is the compute dtype); the quantization state
(absmax, code; a few % of the packed size) stays whole on every rank and is handed back to
the gathered weight before each block runs.

`shard(model, d, dtype, tokenizer)` does this in place after LoRA is attached and the speed
options are applied; `model.adapters_fsdp` then holds the base's fingerprint (taken before
sharding, for the manifest) and the per-rank memory figures for the pre-flight line.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..model import base_fingerprint
from .distributed import Dist
from .offload import decoder_blocks

log = logging.getLogger(__name__)


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _quantized(base: nn.Module) -> dict[nn.Module, object]:
    """bitsandbytes 4-bit layers and their quantization state (kept whole on every rank)."""
    return {m: m.weight.quant_state for m in base.modules()
            if getattr(getattr(m, "weight", None), "quant_state", None) is not None}


def _give_back_quant_state(layers: dict[nn.Module, object]):
    """A block pre-forward hook (after FSDP's gather): the gathered weight is a plain tensor,
    so its 4-bit layers get their quantization state attached again."""
    def hook(_module, _args):
        for layer, state in layers.items():
            if getattr(layer.weight, "quant_state", None) is None:
                layer.weight.quant_state = state
    return hook


def _mesh(d: Dist, device: str):
    """A 1-D mesh of all ranks; a single process gets a group of its own (the FSDP code path
    on one device, e.g. to compare it with plain training)."""
    kind = device.split(":")[0]
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if kind == "cuda" else "gloo", store=tdist.HashStore(),
                                 rank=0, world_size=1)
    return init_device_mesh(kind, (d.world,))


def shard(model: nn.Module, d: Dist, dtype: torch.dtype, tokenizer, device: str) -> dict:
    """Shard the frozen base of the peft `model` across the ranks of `d`, in place.

    Returns (and sets as `model.adapters_fsdp`) {"fingerprint", "rank_weight_bytes",
    "full_weight_bytes", "replicated_bytes"}.
    """
    base = model.get_base_model()
    fingerprint = base_fingerprint(base, tokenizer)  # the weights are whole only now
    full = sum(_bytes(p) for p in model.parameters())
    keep = {p for p in model.parameters() if p.requires_grad}
    keep |= set(base.get_output_embeddings().parameters())
    quant = _quantized(base)
    # The base is already stored in the compute dtype (a 4-bit base's packed weights in their
    # storage dtype): no cast on gather, and none of the frozen weights has a gradient to
    # reduce. LoRA tensors are not FSDP's, so their fp32 master copies stay as they are.
    policy = MixedPrecisionPolicy(param_dtype=None if quant else dtype,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    mesh = _mesh(d, device)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=keep)
        layers = {m: s for m, s in quant.items() if any(m is x for x in block.modules())}
        if layers:
            block.register_forward_pre_hook(_give_back_quant_state(layers))
    fully_shard(base.get_decoder(), mesh=mesh, mp_policy=policy, ignored_params=keep)
    for p in keep:
        if not p.requires_grad:
            # The weights may be views of the safetensors file, mapped whole: one left as
            # such (the lm_head) would keep every page the sharding read resident.
            p.data = p.data.clone()
    rank_bytes = sum(_bytes(p) for p in model.parameters())
    replicated = sum(_bytes(p) for p in model.parameters() if not hasattr(p, "to_local"))
    info = {"fingerprint": fingerprint, "rank_weight_bytes": rank_bytes,
            "full_weight_bytes": full, "replicated_bytes": replicated}
    log.info("pre-flight: FSDP over %d rank(s): %.1f MB of weights per rank of %.1f MB "
             "(%.1f MB replicated: LoRA%s)", d.world, rank_bytes / 1e6, full / 1e6,
             replicated / 1e6, " and the lm_head" if not quant else ", lm_head, 4-bit states")
    model.adapters_fsdp = info
    return info


def fingerprint(model: nn.Module) -> dict | None:
    """The base's fingerprint taken before sharding (None when the model is not sharded)."""
    return getattr(model, "adapters_fsdp", {}).get("fingerprint")


def per_rank_estimate(model: nn.Module, est: dict) -> dict:
    """`runtime.estimate_memory`'s figures with the weights each rank holds under FSDP
    (the estimate counts every weight whole); unchanged when the model is not sharded."""
    info = getattr(model, "adapters_fsdp", None)
    if not info:
        return est
    weights = info["rank_weight_bytes"]
    return {**est, "total": est["total"] - est["weights"] + weights, "weights": weights}
