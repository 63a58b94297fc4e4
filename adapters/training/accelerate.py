"""The speed and memory options of a run, applied to the LoRA model before its first step.

In this order: activation checkpointing (plain, or with block inputs offloaded to the host),
the fused LoRA op in place of peft's layer forward, compiled decoder blocks. Each leaves the
module names and parameters as they are, so the adapter folder is peft's either way.
"""

from __future__ import annotations

import logging

from ..config import TrainConfig
from ..kernels.attention import attention_choice, install_attention
from ..kernels.liger import apply_liger
from ..kernels.liger import choose as choose_liger
from ..kernels.lora import install_fused_lora
from .compile import choose, compile_blocks
from .offload import offload_checkpointing

log = logging.getLogger(__name__)


def accelerate(model, t: TrainConfig, device: str, steps: int) -> dict:
    """Apply `train.gradient_checkpointing / offload_checkpoints / fused_lora / attention /
    liger / compile`.

    Logs the pre-flight line that says whether blocks are compiled and why; returns what was
    done: {"compile": bool, "compile_reason": str, "fused_lora_layers": int, ...}.
    """
    four_bit = getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    untested = ", ".join(name for name, on in (("train.parallel=fsdp", t.parallel == "fsdp"),
                                               ("offloaded checkpoints", t.offload_checkpoints),
                                               ("a 4-bit base", four_bit),
                                               # rollouts decode with a growing KV cache
                                               ("train.objective=grpo", t.objective == "grpo"))
                        if on)
    compiled, why = choose(t.compile, device, steps, untested or None)
    done = {"compile": compiled, "compile_reason": why, "offloaded_blocks": 0,
            "fused_lora_layers": 0}
    if t.offload_checkpoints:
        done["offloaded_blocks"] = offload_checkpointing(model)
    elif t.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.fused_lora:
        # Under compile each projection is its own op: the shared-input bookkeeping of a
        # group is Python state that a tracer should not have to guard on.
        done["fused_lora_layers"] = install_fused_lora(model, group=not compiled)
    done["attention"] = install_attention(model, t.attention)
    done["liger"], liger_why = choose_liger(t.liger, device,
                                            model.get_base_model().config.model_type)
    if done["liger"]:
        apply_liger(model)
    if compiled:
        done["compiled_blocks"] = compile_blocks(model)
    log.info("pre-flight: compile %s (%s); fused LoRA on %d layers; attention %s; liger %s%s",
             "on" if compiled else "off", why, done["fused_lora_layers"],
             attention_choice(t.attention, device), liger_why,
             f"; {done['offloaded_blocks']} blocks checkpointed with inputs offloaded"
             if done["offloaded_blocks"] else "")
    return done  # the run keeps it: fit reads whether the first step included a compile
