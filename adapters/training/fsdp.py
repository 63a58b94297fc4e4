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
  * a task head (`model.task`, peft's modules_to_save): trained in full like LoRA, so it is
    replicated like LoRA (hidden x num_labels: smaller than one LoRA layer), its gradient
    summed with LoRA's, saved by rank 0 from its own copy. The loss applies it to the
    decoder's output outside any sharded module.
Quantized bases: bitsandbytes' packed weights (4-bit, in `bnb_4bit_quant_storage`) and int8
weights (8-bit) shard like any tensor (FSDP gathers a block's mixed dtypes as bytes); the
quantization state (4-bit: absmax, quant_map, the nested double-quant state; 8-bit: the row
scales; a few % of the packed size) stays whole on every rank and is handed back to the
gathered weights before each block runs.

Loading (fsdp_load.py): only rank 0 reads the base, quantized or not, with or without a task
head, onto the host; the other ranks build the same model on the meta device (shapes and
dtypes, no storage) from rank 0's description, its quantization states included, attach LoRA
and shard it the same way, then `shard` sends rank 0's weights one tensor at a time into every
rank's shards (`set_model_state_dict(..., broadcast_from_rank0=True)`): the host holds one
whole base on rank 0 and the shards, never a whole base per rank, and rank 0's LoRA (and head)
initialisation reaches every rank with the same broadcast.

`shard(model, d, dtype, tokenizer)` does this in place after LoRA is attached and the speed
options are applied, and returns the base's fingerprint (taken before sharding, for the
manifest) and the per-rank memory figures for the pre-flight line: the run keeps them.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..model import base_fingerprint
from .distributed import Dist, collective
from .offload import decoder_blocks

log = logging.getLogger(__name__)


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _quantized(base: nn.Module, device: str) -> dict[nn.Module, object]:
    """bitsandbytes layers and their quantization state, moved to `device` and kept whole on
    every rank: a 4-bit layer's QuantState, an 8-bit layer's row scales (SCB)."""
    found = {}
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.weight.quant_state.to(device)  # in place
            found[m] = m.weight.quant_state
        elif isinstance(m, bnb.nn.Linear8bitLt):
            scb = getattr(m.weight, "SCB", None)
            found[m] = (scb if scb is not None else m.state.SCB).to(device)
    return found


def _give_back_quant_state(layers: dict[nn.Module, object]):
    """A block pre-forward hook (after FSDP's gather): the gathered weight is a plain tensor
    without bitsandbytes' attributes, so each layer gets its state back. A 4-bit layer reads
    it from its weight; an 8-bit layer multiplies with the int8 matrix and scales held in its
    matmul state, so both go there (the gathered weight's storage, refilled by FSDP before
    backward and freed after, so holding it keeps nothing alive)."""
    def hook(_module, _args):
        for layer, state in layers.items():
            if isinstance(layer, bnb.nn.Linear8bitLt):
                layer.weight.CB = None  # its forward would otherwise look for Int8Params' CB
                layer.state.CB, layer.state.SCB = layer.weight.data, state
            elif getattr(layer.weight, "quant_state", None) is None:
                layer.weight.quant_state = state
    return hook


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict's parameters and buffers: without the quantization states bitsandbytes
    adds to it, which every rank already has (fsdp_load) and no model loads back."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _mesh(d: Dist, device: str):
    """A 1-D mesh of all ranks; a single process gets a group of its own (the FSDP code path
    on one device, e.g. to compare it with plain training)."""
    kind = device.split(":")[0]
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if kind == "cuda" else "gloo", store=tdist.HashStore(),
                                 rank=0, world_size=1)
    return init_device_mesh(kind, (d.world,))


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

    Only rank 0 has read the base (fsdp_load.py); the others hold it on the meta device.
    Returns {"fingerprint", "rank_weight_bytes", "full_weight_bytes", "replicated_bytes"}:
    the run keeps it (`Run.fsdp`).
    """
    base = model.get_base_model()
    mesh = _mesh(d, device)
    # The weights are whole only now, on rank 0 alone.
    fingerprint = base_fingerprint(base, tokenizer) if d.main else None
    if d.active:
        sent = [fingerprint]
        collective(d, lambda: tdist.broadcast_object_list(sent, 0), "the base's fingerprint")
        fingerprint = sent[0]
    # Rank 0's whole weights (references, not copies) outlive the sharding below, to be sent.
    whole = _weights(model) if d.main else {}
    full = sum(_bytes(p) for p in model.parameters())
    keep = {p for p in model.parameters() if p.requires_grad}  # LoRA, a task head
    head = base.get_output_embeddings()  # None with a task head instead of the lm_head
    keep |= set(head.parameters()) if head is not None else set()
    quant = _quantized(base, device)
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
    _fill_from_rank0(model, whole, d, device)
    rank_bytes = sum(_bytes(p) for p in model.parameters())
    replicated = sum(_bytes(p) for p in model.parameters() if not hasattr(p, "to_local"))
    info = {"fingerprint": fingerprint, "rank_weight_bytes": rank_bytes,
            "full_weight_bytes": full, "replicated_bytes": replicated}
    whole_too = [what for what, there in (("the task head", head is None), ("the lm_head",
                 head is not None), ("quantization states", quant)) if there]
    log.info("pre-flight: FSDP over %d rank(s): %.1f MB of weights per rank of %.1f MB "
             "(%.1f MB replicated: LoRA, %s); %s", d.world, rank_bytes / 1e6, full / 1e6,
             replicated / 1e6, ", ".join(whole_too), "the base read by rank 0 alone")
    return info


def per_rank_estimate(info: dict | None, est: dict) -> dict:
    """`runtime.estimate_memory`'s figures with the weights each rank holds under FSDP
    (the estimate counts every weight whole); unchanged when not sharded (`info` None)."""
    if not info:
        return est
    weights = info["rank_weight_bytes"]
    return {**est, "total": est["total"] - est["weights"] + weights, "weights": weights}
