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

Loading: only rank 0 reads the base (onto the host: `load_device`); the other ranks build the same
model on the meta device (shapes and dtypes, no storage), attach LoRA and shard it the same
way, then `shard` sends rank 0's weights one tensor at a time into every rank's shards
(`set_model_state_dict(..., broadcast_from_rank0=True)`): the host holds one whole base on
rank 0 and the shards, never a whole base per rank, and rank 0's LoRA initialisation reaches
every rank with the same broadcast. Quantized bases still load whole on every rank: a
bitsandbytes weight is quantized as it loads onto its device and carries its quantization
state as attributes of the tensor, which a state dict broadcast does not rebuild.

`shard(model, d, dtype, tokenizer)` does this in place after LoRA is attached and the speed
options are applied; `model.adapters_fsdp` then holds the base's fingerprint (taken before
sharding, for the manifest) and the per-rank memory figures for the pre-flight line.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..config import RunConfig
from ..model import base_fingerprint, default_device
from .distributed import Dist, collective
from .offload import decoder_blocks

log = logging.getLogger(__name__)

_FROM_RANK0 = "adapters_fsdp_from_rank0"  # set on a base that only rank 0 has read


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


def _rank0_loads(cfg: RunConfig) -> bool:
    """Whether only rank 0 reads the base: fsdp on an unquantized causal LM (a new task head
    and bitsandbytes' weights still load whole on every rank)."""
    return (cfg.train.parallel == "fsdp" and cfg.model.quantization == "none"
            and cfg.model.task == "causal_lm")


def load_device(cfg: RunConfig, d: Dist, device: str | None) -> str | None:
    """Where this rank loads the base: under fsdp rank 0 onto the host and the other ranks
    on the meta device (shapes and dtypes, nothing read), to be filled by `shard`; else
    `device`."""
    if not _rank0_loads(cfg):
        return device
    return "cpu" if d.main else "meta"


def train_device(cfg: RunConfig, d: Dist, model: nn.Module, device: str | None) -> str:
    """The device this rank trains on, once `model` is loaded where `load_device` said."""
    if not _rank0_loads(cfg):
        return str(model.device)
    setattr(model, _FROM_RANK0, True)
    return device or default_device()


def from_rank0(model: nn.Module) -> bool:
    """True when this base's weights (LoRA's too) reach this rank only in `shard`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, _FROM_RANK0, False)


class _Gather:
    """FSDP's all-gather of a block's shards (as its default one does it), with a dead peer
    reported as under ddp: "lost contact with the other ranks" instead of gloo's traceback
    from inside a forward or backward hook."""

    def __init__(self, d: Dist):
        self.d = d

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        def gather():
            work = tdist.all_gather_into_tensor(output_tensor, input_tensor, group=group,
                                                async_op=async_op)
            if work is not None:
                work.wait()  # a failure shows here, not later inside FSDP's own wait
            return work
        return collective(self.d, gather, "a sharded block's all-gather")


def _fill_from_rank0(model: nn.Module, full: dict, d: Dist, device: str) -> None:
    """Every rank's shards and whole copies (lm_head, LoRA) from rank 0's `full` state dict,
    one tensor at a time (a rank other than 0 never holds more than one whole tensor at
    once), then the buffers no state dict holds (RoPE's inv_freq). `full` is emptied."""
    dev = torch.device(device)
    if d.main and dev.type != "cpu":  # rank 0 read onto the host: what FSDP left there
        for t in [*model.parameters(), *model.buffers()]:
            if not isinstance(t, DTensor) and t.device.type == "cpu":
                t.data = t.data.to(dev)
    # Loading onto meta assigns a new tensor per name: note the tied ones (GPT-2's lm_head is
    # its embedding) to tie them again, rather than hold the embedding twice.
    first, ties = {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        first.setdefault(id(p), name)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=opts)  # its own errors, whatever they are
    full.clear()
    for name, source in ties:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    sent = {}
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in sent:
                t = torch.empty_like(buf, device=dev) if buf.is_meta else buf
                collective(d, lambda t=t: tdist.broadcast(t, 0), "the base's buffers")
                sent[id(buf)] = t
            if buf is not None:
                module._buffers[key] = sent[id(buf)]


def shard(model: nn.Module, d: Dist, dtype: torch.dtype, tokenizer, device: str) -> dict:
    """Shard the frozen base of the peft `model` across the ranks of `d`, in place.

    Returns (and sets as `model.adapters_fsdp`) {"fingerprint", "rank_weight_bytes",
    "full_weight_bytes", "replicated_bytes"}.
    """
    base = model.get_base_model()
    mesh = _mesh(d, device)
    rank0 = from_rank0(model)
    # The weights are whole only now (on rank 0 alone when the others are on meta).
    fingerprint = base_fingerprint(base, tokenizer) if d.main or not rank0 else None
    if rank0 and d.active:
        sent = [fingerprint]
        collective(d, lambda: tdist.broadcast_object_list(sent, 0), "the base's fingerprint")
        fingerprint = sent[0]
    # Rank 0's whole weights (references, not copies) outlive the sharding below, to be sent.
    whole = model.state_dict() if rank0 and d.main else {}
    full = sum(_bytes(p) for p in model.parameters())
    keep = {p for p in model.parameters() if p.requires_grad}
    keep |= set(base.get_output_embeddings().parameters())
    quant = _quantized(base)
    # The base is already stored in the compute dtype (a 4-bit base's packed weights in their
    # storage dtype): no cast on gather, and none of the frozen weights has a gradient to
    # reduce. LoRA tensors are not FSDP's, so their fp32 master copies stay as they are.
    policy = MixedPrecisionPolicy(param_dtype=None if quant else dtype,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=keep)
        block.set_custom_all_gather(_Gather(d))
        layers = {m: s for m, s in quant.items() if any(m is x for x in block.modules())}
        if layers:
            block.register_forward_pre_hook(_give_back_quant_state(layers))
    fully_shard(base.get_decoder(), mesh=mesh, mp_policy=policy, ignored_params=keep)
    base.get_decoder().set_custom_all_gather(_Gather(d))
    for p in keep:
        if not p.requires_grad:
            # The weights may be views of the safetensors file, mapped whole: one left as
            # such (the lm_head) would keep every page the sharding read resident.
            p.data = p.data.clone()
    if rank0:
        _fill_from_rank0(model, whole, d, device)
    rank_bytes = sum(_bytes(p) for p in model.parameters())
    replicated = sum(_bytes(p) for p in model.parameters() if not hasattr(p, "to_local"))
    info = {"fingerprint": fingerprint, "rank_weight_bytes": rank_bytes,
            "full_weight_bytes": full, "replicated_bytes": replicated}
    log.info("pre-flight: FSDP over %d rank(s): %.1f MB of weights per rank of %.1f MB "
             "(%.1f MB replicated: LoRA%s); %s", d.world, rank_bytes / 1e6, full / 1e6,
             replicated / 1e6, " and the lm_head" if not quant else ", lm_head, 4-bit states",
             "the base read by rank 0 alone" if rank0 else "the base read by every rank")
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
