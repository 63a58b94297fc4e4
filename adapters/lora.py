"""Attach LoRA adapters with peft: per-architecture target presets, freezing, trainable report."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LoraConfig
from .errors import ModelError
from .heads import head_module

log = logging.getLogger(__name__)

# "auto" targets: every projection of attention and MLP, by model_type.
_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": _LLAMA_STYLE, "mistral": _LLAMA_STYLE, "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE, "gemma": _LLAMA_STYLE, "gemma2": _LLAMA_STYLE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, (nn.Linear, Conv1D))


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers (the names `targets` can use)."""
    # On a model that already has LoRA (another job's adapter): a wrapped layer's linear is
    # its `base_layer`, named by its parent; the adapters' own linears are not targets.
    names = {n.removesuffix(".base_layer").rsplit(".", 1)[-1]
             for n, m in model.named_modules() if _is_linear(m) and ".lora_" not in n}
    return sorted(names)


def resolve_targets(model: nn.Module, targets: str | list[str]) -> str | list[str]:
    """Turn 'auto' / 'all-linear' / a list into what peft takes; check every name matches."""
    available = linear_module_names(model)
    if targets == "all-linear":
        return "all-linear"
    if targets == "auto":
        preset = PRESETS.get(model.config.model_type)
        if preset is None:
            log.info("no LoRA preset for model_type %r: using all-linear", model.config.model_type)
            return "all-linear"
        targets = preset
    if isinstance(targets, str):
        targets = [targets]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    if head_names & set(targets):
        # The fused loss multiplies by the head's own weight (training/loss.py): a LoRA
        # wrapped around it would never see a gradient.
        raise ModelError(f"lora.targets: {sorted(head_names & set(targets))} is the output "
                         "head, which LoRA does not adapt here (the fused loss reads its "
                         "weight directly); leave it out")
    missing = [t for t in targets if t not in available]
    if missing:
        raise ModelError(
            f"lora.targets: {missing} match no linear layer of this "
            f"{model.config.model_type} model; its linear layers are: {', '.join(available)}")
    return list(targets)


def _prepare_quantized(model: nn.Module) -> None:
    """Freeze a 4/8-bit base; its fp16 weights that are not quantized move to fp32.

    peft's prepare_model_for_kbit_training casts every such weight (embeddings, norms, lm_head)
    to fp32, bf16 ones included. fp16 needs it (its range overflows in norms); bf16 has fp32's
    range and the norms compute in fp32 inside anyway, so bf16 weights stay bf16: in fp32 the
    lm_head's matmuls and the residual stream run in fp32, at twice the memory, and HF
    Trainer + peft without that call (the usual QLoRA script) keeps them bf16 too.
    """
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype == torch.float16 and type(p).__name__ != "Params4bit":
            p.data = p.data.float()


def check_rank(model: nn.Module, r: int) -> None:
    """ModelError for a rank above the model's width: lora_A and lora_B would be allocated at
    that size (a billion-rank typo asks for hundreds of GB) and add nothing past min(in, out)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if width and r > width:
        raise ModelError(f"lora.r is {r}, above the model's width of {width}: a rank past "
                         "min(in, out) of a layer adds nothing; lower lora.r")


def attach_lora(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default"):
    """Wrap `model` in a peft LoRA model (or add one more adapter to a peft model); only the
    LoRA weights (of every adapter) require grad."""
    if isinstance(model, PeftModel):
        targets = resolve_targets(model.get_base_model(), cfg.targets)
        head = head_module(model.get_base_model())
    else:
        targets = resolve_targets(model, cfg.targets)
        head = head_module(model)
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(
        model, "is_loaded_in_8bit", False)
    if quantized and not isinstance(model, PeftModel):
        _prepare_quantized(model)
    # A sequence-classification head (heads.py) is peft's SEQ_CLS task: its head is a
    # `modules_to_save` module, trained in full and saved with the LoRA tensors.
    pcfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, bias="none",
        task_type="SEQ_CLS" if head else "CAUSAL_LM",
        modules_to_save=[head[0]] if head else None,
        fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D stores W^T
    if isinstance(model, PeftModel):  # another adapter on the same base (training/jobs.py)
        model.add_adapter(adapter_name, pcfg)
        peft_model = model
    else:
        peft_model = get_peft_model(model, pcfg, adapter_name=adapter_name)
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name or ".modules_to_save." in name)
        if p.requires_grad and p.dtype != torch.float32:
            # Adapter weights stay fp32 even on a bf16 base; autocast handles the matmuls.
            p.data = p.data.float()
    return peft_model


def trainable_report(model: nn.Module) -> dict[str, int | float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_param_count(p) for p in model.parameters())
    return {"trainable": trainable, "total": total,
            "percent": round(100.0 * trainable / max(total, 1), 4)}


def _param_count(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per uint8 element.
    quant_state = getattr(p, "quant_state", None)
    return int(quant_state.shape.numel()) if quant_state is not None else p.numel()


def set_adapter_training(model: nn.Module, training: bool = True) -> None:
    """Train mode in which only the adapters are stochastic: the base's dropout is off.

    The base's own dropout (GPT-2 has 0.1) would add noise to weights we do not train and
    make steps irreproducible across batch splits; LoRA's dropout is `lora.dropout`. The
    modules stay in train mode, because transformers' gradient checkpointing only runs there.
    """
    model.train(training)
    for name, m in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
