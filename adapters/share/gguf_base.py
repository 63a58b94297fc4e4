"""An HF model folder (Llama-family or GPT-2, byte-level BPE tokenizer) as one GGUF file.

Used for `adapters export --to gguf` when the base is an HF folder, and to give llama.cpp
the base an adapter was trained on when no GGUF of it exists. Hyperparameter keys follow
llama.cpp's converter for these two architectures; anything else is refused with the
command that converts it properly (llama.cpp's convert_hf_to_gguf.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .gguf_io import (
    ExportError,
    add_tensor,
    arch_of,
    file_type,
    finish,
    gguf_name,
    is_weight,
    name_map,
    to_gguf_layout,
)

_HINT = "convert it with llama.cpp's convert_hf_to_gguf.py instead"


def _hparams(writer: gguf.GGUFWriter, cfg) -> None:
    if cfg.model_type == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"{cfg.name_or_path}: rope scaling {rope['rope_type']!r} is not "
                          f"written here; {_HINT}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)


def _vocab(writer: gguf.GGUFWriter, folder: Path, cfg) -> None:
    """A byte-level BPE tokenizer as llama.cpp's 'gpt2' tokenizer model."""
    spec = folder / "tokenizer.json"
    tj = json.loads(spec.read_text(encoding="utf-8")) if spec.is_file() else {}
    pre = (tj.get("pre_tokenizer") or {})
    if (tj.get("model", {}).get("type") != "BPE" or pre.get("type") != "ByteLevel"
            or not pre.get("use_regex", True)):
        raise ExportError(f"{folder}: only a byte-level BPE tokenizer.json with GPT-2's "
                          f"pre-tokenizer is written here; {_HINT}")
    tok = AutoTokenizer.from_pretrained(folder)
    n = max(cfg.vocab_size, len(tok))
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    tokens += [f"[PAD{i}]" for i in range(len(tok), n)]
    special = set(tok.all_special_ids)
    added = set(tok.added_tokens_decoder)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED
             if i in added else gguf.TokenType.NORMAL for i in range(len(tok))]
    types += [gguf.TokenType.UNUSED] * (n - len(tok))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n)
    special_vocab.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(False)


def write_hf_gguf(folder: str | Path, out: str | Path, out_type: str = "f16",
                  state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model in `folder` (or `state_dict` with its config and tokenizer) as GGUF.

    `out_type` (f32 | f16 | bf16 | q8_0) applies to matrices; norms and biases stay f32.
    """
    folder, out = Path(folder), Path(out)
    model = None
    if state_dict is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        state_dict = model.state_dict()
        cfg = model.config
    else:
        from transformers import AutoConfig  # only this path needs the bare config

        cfg = AutoConfig.from_pretrained(folder)
    arch = arch_of(cfg.model_type, str(folder))
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    tmap = name_map(cfg.model_type, n_layers)
    writer_tensors = []
    for hf_name, t in state_dict.items():
        if not is_weight(hf_name):
            continue
        name = gguf_name(tmap, hf_name)
        if name is None:
            raise ExportError(f"{folder}: tensor {hf_name} has no GGUF name; {_HINT}")
        w = t.detach().float().cpu().numpy()
        if cfg.model_type == "gpt2" and w.ndim == 2 and not hf_name.endswith(("wte.weight",
                                                                              "wpe.weight",
                                                                              "lm_head.weight")):
            w = w.T  # Conv1D stores (in, out)
        writer_tensors.append((name, to_gguf_layout(cfg.model_type, name, w, cfg)))
    writer = gguf.GGUFWriter(out, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_file_type(file_type(out_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hparams(writer, cfg)
    _vocab(writer, folder, cfg)
    for name, w in writer_tensors:
        add_tensor(writer, name, np.ascontiguousarray(w), out_type)
    finish(writer)
    del model
    return out
