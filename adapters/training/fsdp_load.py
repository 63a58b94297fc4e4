"""Loading the base under `train.parallel: fsdp`: rank 0 alone reads it.

The first step of sharded training (fsdp.py shards what this loads); every other run loads
with `heads.load_model` (the base, or the base with a new task head). Rank 0 reads it onto the
host and describes it to the others (`_layout`): its config (a task head's label
names and pad token are in it) and every bitsandbytes layer with its packed weight's shape and
its quantization state's tensors. The others build the same model on the meta device (shapes
and dtypes, no storage, nothing read from disk), with each quantized layer in place and its
quantization state received from rank 0, one tensor at a time. `fsdp.shard` then sends rank 0's
weights into every rank's shards.

Why the quantization state travels here and not with the weights: bitsandbytes keeps it as an
attribute of the weight tensor (4-bit: absmax, quant_map and the nested double-quant state,
`weight.quant_state`; 8-bit: the row scales `weight.SCB`), which a state-dict broadcast does not
rebuild, and the skeleton needs it before LoRA is attached (peft picks its bitsandbytes LoRA
layer from the base layer's class). It is small (~3% of the packed weights for nf4 with
double quant, 1/in_features of int8 weights) and stays whole on every rank.
"""

from __future__ import annotations

import copy
import logging

import bitsandbytes as bnb
import torch
import torch.distributed as tdist
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ..config import RunConfig
from ..data.labels import Targets
from ..model import default_device, load_tokenizer, resolve_dtype, resolve_model_path
from .distributed import Dist, collective
from .heads import load_model

log = logging.getLogger(__name__)

def load(cfg: RunConfig, d: Dist, device: str | None, targets: Targets | None):
    """(model, tokenizer, train device) under train.parallel=fsdp: the base (with a new head
    for a task) for this rank. Rank 0 reads it onto the host and the other ranks build it on
    the meta device, to be filled by `fsdp.shard`."""
    if d.main:
        model, tok = load_model(cfg, "cpu", targets)
    if d.active:
        layout = [_layout(model) if d.main else None]
        collective(d, lambda: tdist.broadcast_object_list(layout, 0), "the base's layout")
        if not d.main:
            model, tok = _skeleton(cfg, targets, layout[0])
        _send_quant_states(model, layout[0]["quant"], d)
    return model, tok, device or default_device()




def _layout(model: nn.Module) -> dict:
    """What another rank needs to build `model` without reading it: the config and, per
    bitsandbytes layer, its constructor's arguments and the shapes of its tensors."""
    quant = {}
    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            continue
        spec = {"in": m.in_features, "out": m.out_features, "weight": (m.weight.shape,
                m.weight.dtype), "bias": None if m.bias is None else m.bias.dtype,
                "state": {k: (v.shape, v.dtype) for k, v in _quant_state(m).items()}}
        if isinstance(m, bnb.nn.Linear4bit):
            w = m.weight
            spec.update(kind="4bit", compute_dtype=m.compute_dtype, quant_type=w.quant_type,
                        blocksize=w.blocksize, compress=w.compress_statistics,
                        storage=w.quant_storage)
        else:
            spec.update(kind="8bit", threshold=m.state.threshold)
        quant[name] = spec
    return {"config": model.config, "quant": quant}


def _quant_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A bitsandbytes layer's quantization state as tensors (4-bit: as its state dict has
    them, the non-tensor fields packed into one uint8 tensor)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return layer.weight.quant_state.as_dict(packed=True)
    scb = getattr(layer.weight, "SCB", None)
    return {"SCB": scb if scb is not None else layer.state.SCB}


def _skeleton(cfg: RunConfig, targets: Targets | None, layout: dict):
    """The model rank 0 read, on the meta device: its own config's architecture, with its
    bitsandbytes layers (`_send_quant_states` gives them their states).

    Built from rank 0's config with `from_config` under the meta device, never through
    `from_pretrained` (which refuses a meta device map in transformers >= 5.25): nothing is
    read from disk but the tokenizer, and a task head's config carries rank 0's label names.
    """
    config = copy.deepcopy(layout["config"])
    config.__dict__.pop("quantization_config", None)
    auto = AutoModelForCausalLM if targets is None else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, dtype=resolve_dtype(cfg.model.dtype, "cpu"),
                                 attn_implementation="sdpa")
    model.eval()
    model.config.use_cache = False
    tok = load_tokenizer(resolve_model_path(cfg.model.name))
    kinds = {spec["kind"] for spec in layout["quant"].values()}
    for kind in kinds:  # read by peft (its bitsandbytes LoRA layers) and by attach_lora
        setattr(model, f"is_loaded_in_{kind}", True)
    return model, tok


def _send_quant_states(model: nn.Module, quant: dict, d: Dist) -> None:
    """Every bitsandbytes layer's state from rank 0, one tensor at a time; on the other
    ranks each layer of `quant` is put in place, on meta, with the state it received."""
    for name, spec in quant.items():
        if d.main:
            state = _quant_state(model.get_submodule(name))
        else:
            state = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in
                     spec["state"].items()}
        for key in sorted(state):
            state[key] = _broadcast(state[key], d)
        if not d.main:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, _quantized_layer(spec, state))


def _broadcast(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Rank 0's `t` on every rank, kept on the host. NCCL (several GPUs) moves only CUDA
    tensors, so the tensor travels through this rank's GPU there and comes back."""
    nccl = tdist.get_backend() == "nccl"
    moving = t.to(torch.device("cuda", torch.cuda.current_device())) if nccl else t
    collective(d, lambda: tdist.broadcast(moving, 0), "the base's quantization states")
    return moving.cpu() if nccl else t


def _quantized_layer(spec: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A bitsandbytes layer on meta as rank 0 has it, its quantization state attached."""
    shape, dtype = spec["weight"]
    bias = spec["bias"] is not None
    if spec["kind"] == "4bit":
        layer = bnb.nn.Linear4bit(spec["in"], spec["out"], bias=bias,
                                  compute_dtype=spec["compute_dtype"],
                                  compress_statistics=spec["compress"],
                                  quant_type=spec["quant_type"],
                                  quant_storage=spec["storage"], device="meta")
        qs = bnb.functional.QuantState.from_dict(state, device="cpu")
        layer.weight = bnb.nn.Params4bit(
            torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False,
            quant_state=qs, blocksize=spec["blocksize"], compress_statistics=spec["compress"],
            quant_type=spec["quant_type"], quant_storage=spec["storage"], module=layer,
            bnb_quantized=True)
        layer.quant_state = qs
    else:
        layer = bnb.nn.Linear8bitLt(spec["in"], spec["out"], bias=bias, has_fp16_weights=False,
                                    threshold=spec["threshold"], device="meta")
        layer.weight = bnb.nn.Int8Params(torch.empty(shape, dtype=dtype, device="meta"),
                                         requires_grad=False, has_fp16_weights=False,
                                         SCB=state["SCB"])
    if bias:
        layer.bias.data = layer.bias.data.to(spec["bias"])
    return layer
