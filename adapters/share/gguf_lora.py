"""A peft LoRA adapter as llama.cpp sees it: a LoRA GGUF, or merged into a GGUF base.

llama.cpp applies `W x + scale * B (A x)` per tensor with scale = alpha / rank (rank read
from A's shape) and one alpha per file. peft's per-module scaling (rsLoRA, rank or alpha
patterns) is folded into B, so any plain LoRA is expressed exactly. What llama.cpp cannot
express (DoRA's magnitudes, trained biases, whole modules saved, targets it has no tensor
for) is refused with the reason, by `llama_cpp_problems`, which `verify --target` shares.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
from safetensors.torch import load_file

from ..adapter import CONFIG_FILE, WEIGHTS_FILE, Manifest
from .gguf_io import (
    ARCHS,
    ExportError,
    add_tensor,
    arch_of,
    copy_metadata,
    dequantized,
    file_type,
    finish,
    gguf_name,
    name_map,
    to_gguf_layout,
)

_PREFIX = "base_model.model."


@dataclass
class LoraTensor:
    """One adapted GGUF tensor: delta = scale * b @ a, already in GGUF row order."""
    name: str       # e.g. blk.0.attn_q.weight
    a: np.ndarray   # (r, in)
    b: np.ndarray   # (out, r), peft's scaling folded in beyond alpha / r
    scale: float    # alpha / r, what llama.cpp applies

    def delta(self) -> np.ndarray:
        return (self.b.astype(np.float64) @ self.a.astype(np.float64) * self.scale).astype(
            np.float32)


def base_config(manifest: Manifest | None, folder: Path) -> SimpleNamespace:
    """model_type and shape fields of the base, from the manifest's fingerprint."""
    fp = manifest.base.fingerprint if manifest else None
    if fp is None or not fp.model_type:
        raise ExportError(f"{folder}: the manifest has no base fingerprint (model_type, "
                          "shapes); run `adapters convert --base BASE` on it first")
    cfg = dict(fp.config or {})
    cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    return SimpleNamespace(model_type=fp.model_type, **cfg)


def n_layers(cfg: SimpleNamespace) -> int:
    return getattr(cfg, "num_hidden_layers", None) or cfg.n_layer


def llama_cpp_problems(peft_cfg: dict, model_type: str | None) -> list[tuple[str, str]]:
    """(field, what to do) for each part of an adapter config llama.cpp cannot apply."""
    out = []
    if peft_cfg.get("peft_type", "LORA") != "LORA":
        out.append(("peft_type", f"{peft_cfg['peft_type']} is not LoRA: llama.cpp loads only "
                                 "LoRA adapters; merge it and export with --to gguf"))
    if peft_cfg.get("use_dora"):
        out.append(("use_dora", "llama.cpp applies plain LoRA only (W + s*BA); DoRA's "
                                "magnitude vectors cannot be expressed: export the merged "
                                "model with --to gguf"))
    if peft_cfg.get("bias", "none") != "none":
        out.append(("bias", f"bias={peft_cfg['bias']!r}: llama.cpp's LoRA has no bias terms; "
                            "train with bias='none' or export the merged model (--to gguf)"))
    if peft_cfg.get("modules_to_save"):
        out.append(("modules_to_save", f"{peft_cfg['modules_to_save']}: whole saved modules are "
                                       "not LoRA: export the merged model (--to gguf)"))
    if model_type is not None and model_type not in ARCHS:
        out.append(("base.model_type", f"{model_type!r}: LoRA GGUF export supports "
                                       f"{', '.join(sorted(ARCHS))}"))
    return out


def _pattern(patterns: dict, module: str, default):
    # peft's rule: a pattern key matches the module name or a dotted suffix of it.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_tensors(folder: Path, manifest: Manifest | None) -> tuple[list[LoraTensor], float]:
    """The adapter's LoRA pairs under GGUF names with their layout fixed, and its alpha."""
    peft_cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg = base_config(manifest, folder)
    problems = llama_cpp_problems(peft_cfg, cfg.model_type)
    if problems:
        field, why = problems[0]
        raise ExportError(f"{folder / CONFIG_FILE}: {field}: {why}")
    alpha = float(peft_cfg["lora_alpha"])
    rslora = bool(peft_cfg.get("use_rslora"))
    tmap = name_map(cfg.model_type, n_layers(cfg))
    weights = load_file(folder / WEIGHTS_FILE)
    out = []
    for key in sorted(weights):
        if not key.endswith(".lora_A.weight"):
            if ".lora_A" not in key and ".lora_B" not in key:
                raise ExportError(f"{folder / WEIGHTS_FILE}: tensor {key} is not a LoRA pair "
                                  "(embedding LoRA or saved module): export --to gguf")
            continue
        module = key[len(_PREFIX):-len(".lora_A.weight")]
        name = gguf_name(tmap, module + ".weight")
        if name is None:
            raise ExportError(f"{folder / CONFIG_FILE}: target {module} has no llama.cpp "
                              f"tensor in the {cfg.model_type} architecture; drop it from "
                              "target_modules or export the merged model (--to gguf)")
        a = weights[key].float().numpy()  # adapters saved in bf16 too
        b = weights[key.replace(".lora_A.", ".lora_B.")].float().numpy()
        r = a.shape[0]
        a_i = float(_pattern(peft_cfg.get("alpha_pattern") or {}, module, alpha))
        peft_scale = a_i / math.sqrt(r) if rslora else a_i / r
        b = to_gguf_layout(cfg.model_type, name, b * (peft_scale / (alpha / r)), cfg)
        out.append(LoraTensor(name, a, np.ascontiguousarray(b, dtype=np.float32), alpha / r))
    if not out:
        raise ExportError(f"{folder / WEIGHTS_FILE}: no LoRA tensors found")
    return out, alpha


def write_lora_gguf(folder: Path, manifest: Manifest | None, out: str | Path) -> Path:
    """`general.type = adapter`, `adapter.type = lora`, tensors NAME.lora_a / NAME.lora_b."""
    tensors, alpha = lora_tensors(folder, manifest)
    arch = arch_of(base_config(manifest, folder).model_type, str(folder))
    writer = gguf.GGUFWriter(out, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(folder).resolve().name)
    for t in tensors:
        writer.add_tensor(t.name + ".lora_a", t.a)
        writer.add_tensor(t.name + ".lora_b", t.b)
    finish(writer)
    return Path(out)


def write_merged_from_gguf(folder: Path, manifest: Manifest | None, base_gguf: Path,
                           out: str | Path, out_type: str) -> Path:
    """The base GGUF's metadata and tokenizer with base + delta tensors, in `out_type`."""
    tensors, _ = lora_tensors(folder, manifest)
    deltas = {t.name: t for t in tensors}
    reader = gguf.GGUFReader(str(base_gguf))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    names = {t.name for t in reader.tensors}
    missing = sorted(set(deltas) - names)
    if missing:
        raise ExportError(f"{base_gguf}: has no tensor {missing[0]} that the adapter adapts: "
                          "another base model?")
    writer = gguf.GGUFWriter(out, arch)
    copy_metadata(reader, writer, skip=(gguf.Keys.General.QUANTIZATION_VERSION,))
    writer.add_file_type(file_type(out_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in reader.tensors:
        w = dequantized(t)
        if t.name in deltas:
            d = deltas[t.name].delta()
            if d.shape != w.shape:
                raise ExportError(f"{base_gguf}: {t.name} is {w.shape}, the adapter's "
                                  f"delta {d.shape}: another base model?")
            w = w + d
        add_tensor(writer, t.name, w, out_type)
    finish(writer)
    return Path(out)
