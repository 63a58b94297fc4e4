"""Static checks of an adapter against another runtime's documented limits, and peft downgrades.

`adapters verify --target vllm|llama.cpp|peft==X.Y` reads only the adapter's files. Each
failed check names the field and the fix. The vLLM limits are those of its LoRA support
(vLLM 0.6-0.11: `--max-lora-rank` takes one of its listed ranks, default 16; no DoRA; no
`modules_to_save`; bias only behind a flag that newer releases removed; per-architecture
target modules). The peft limits are the `LoraConfig` fields of each release, recorded from
its wheel by `scripts/check_interop --record-peft` into peft_fields.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig as PeftLoraConfig
from safetensors import safe_open

from ..adapter import CONFIG_FILE, WEIGHTS_FILE, Manifest, check_files
from ..adapter.archive import resolve_adapter
from ..io import atomic_dir
from .gguf_io import ExportError
from .gguf_lora import llama_cpp_problems, lora_tensors
from .peft_fields import LORA_CONFIG_FIELDS

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values --max-lora-rank accepts
VLLM_DEFAULT_MAX_RANK = 16
# Per architecture, the modules vLLM's LoRA layers wrap (q/k/v packed as qkv_proj,
# gate/up as gate_up_proj); GPT-2 has no LoRA support in vLLM.
_LLAMA_STYLE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_MODULES = {"llama": _LLAMA_STYLE, "mistral": _LLAMA_STYLE, "qwen2": _LLAMA_STYLE,
                "qwen3": _LLAMA_STYLE, "gemma": _LLAMA_STYLE, "gemma2": _LLAMA_STYLE,
                "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
                "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}}
TARGETS = ("vllm", "llama.cpp", "peft==X.Y")
_INFORMATIONAL = {"peft_version"}  # records who wrote the file; no effect on the adapter


@dataclass
class TargetCheck:
    name: str
    ok: bool
    detail: str


def _ranks(folder: Path, cfg: dict) -> list[int]:
    ranks = {int(cfg.get("r", 0))}
    ranks.update(int(v) for v in (cfg.get("rank_pattern") or {}).values())
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        with safe_open(weights, "np") as f:
            ranks.update(f.get_slice(k).get_shape()[0] for k in f.keys() if ".lora_A." in k)
    return sorted(ranks)


def _targets(folder: Path) -> set[str]:
    with safe_open(folder / WEIGHTS_FILE, "np") as f:
        return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in f.keys() if ".lora_" in k}


def check_vllm(folder: Path, cfg: dict, manifest: Manifest | None,
               max_lora_rank: int = VLLM_DEFAULT_MAX_RANK) -> list[TargetCheck]:
    out = []
    r = max(_ranks(folder, cfg))
    need = next((v for v in VLLM_RANKS if v >= r), None)
    if need is None:
        out.append(TargetCheck("vllm: rank", False, f"r={r}: above vLLM's largest max_lora_rank "
                               f"({VLLM_RANKS[-1]}); retrain with lora.r <= {VLLM_RANKS[-1]}"))
    elif r > max_lora_rank:
        out.append(TargetCheck("vllm: rank", False, f"r={r} > max_lora_rank {max_lora_rank}: "
                               f"start vLLM with --max-lora-rank {need}"))
    else:
        out.append(TargetCheck("vllm: rank", True, f"r={r} <= max_lora_rank {max_lora_rank}"))
    fixes = {"use_dora": "vLLM does not support DoRA: merge it (`adapters merge`) and serve "
                         "the merged model",
             "modules_to_save": "vLLM loads only LoRA tensors: drop modules_to_save or merge",
             "bias": "adapter biases need vLLM's removed --enable-lora-bias: train with "
                     "bias='none'"}
    bad = {"use_dora": bool(cfg.get("use_dora")), "modules_to_save": bool(
        cfg.get("modules_to_save")), "bias": cfg.get("bias", "none") != "none"}
    for key, is_bad in bad.items():
        out.append(TargetCheck(f"vllm: {key}", not is_bad,
                               f"{key}={cfg.get(key)!r}: {fixes[key]}" if is_bad else "ok"))
    model_type = manifest.base.fingerprint.model_type if manifest and manifest.base.fingerprint \
        else None
    allowed = VLLM_MODULES.get(model_type or "")
    if model_type and allowed is None:
        out.append(TargetCheck("vllm: architecture", False, f"{model_type}: vLLM has no LoRA "
                               "support for it; merge and serve the merged model"))
    elif allowed is not None:
        extra = sorted(_targets(folder) - allowed)
        out.append(TargetCheck("vllm: target modules", not extra,
                               f"{extra}: vLLM's {model_type} LoRA wraps only "
                               f"{sorted(allowed)}; retrain without them or merge" if extra
                               else f"all within {model_type}'s LoRA modules"))
    return out


def check_llama_cpp(folder: Path, cfg: dict, manifest: Manifest | None) -> list[TargetCheck]:
    model_type = manifest.base.fingerprint.model_type if manifest and manifest.base.fingerprint \
        else None
    problems = llama_cpp_problems(cfg, model_type)
    out = [TargetCheck(f"llama.cpp: {field}", False, why) for field, why in problems]
    if not problems:
        try:
            tensors, _ = lora_tensors(folder, manifest)
            out.append(TargetCheck("llama.cpp: tensors", True,
                                   f"{len(tensors)} LoRA tensors map to llama.cpp names"))
        except ExportError as e:
            out.append(TargetCheck("llama.cpp: tensors", False, str(e)))
    return out


def _current_defaults() -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(PeftLoraConfig)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def _fields_for(version: str) -> tuple[str, tuple[str, ...]]:
    known = LORA_CONFIG_FIELDS
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", version):
        raise ExportError(f"peft version {version!r}: write it as X.Y, e.g. 0.13")
    exact = [v for v in known if v == version or v.rsplit(".", 1)[0] == version]
    if not exact:
        raise ExportError(f"peft=={version}: no recorded LoraConfig fields (recorded: "
                          f"{', '.join(known)}); record it with "
                          f"`scripts/check_interop --record-peft {version}`")
    return exact[-1], known[exact[-1]]


def peft_compat(cfg: dict, version: str) -> tuple[dict, list[str], list[TargetCheck]]:
    """(config for that peft, fields dropped, problems): unknown fields are dropped only when
    their value is the default (or empty); otherwise the version cannot express the adapter."""
    recorded, fields = _fields_for(version)
    defaults = _current_defaults()
    kept, dropped, bad = {}, [], []
    for key, value in cfg.items():
        if key in fields:
            kept[key] = value
        elif key in _INFORMATIONAL or value in (None, False, {}, [], "") or \
                value == defaults.get(key):
            dropped.append(key)
        else:
            bad.append(TargetCheck(f"peft=={recorded}: {key}", False,
                                   f"{key}={value!r}: peft {recorded}'s LoraConfig has no such "
                                   "field; it needs a newer peft (or retrain without it)"))
    return kept, dropped, bad


def check_target(path: str | Path, target: str, max_lora_rank: int = VLLM_DEFAULT_MAX_RANK
                 ) -> list[TargetCheck]:
    """The static checks of one target: 'vllm', 'llama.cpp' or 'peft==X.Y'."""
    folder = resolve_adapter(path)  # a folder, or a .zip unpacked once
    manifest = check_files(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if target == "vllm":
        return check_vllm(folder, cfg, manifest, max_lora_rank)
    if target == "llama.cpp":
        return check_llama_cpp(folder, cfg, manifest)
    if target.startswith("peft=="):
        version = target.split("==", 1)[1]
        _, dropped, bad = peft_compat(cfg, version)
        ok = TargetCheck(f"peft=={version}: fields", True,
                         f"loads as is after dropping default-valued {dropped} "
                         "(`adapters export --to peft --peft-version` writes that config)"
                         if dropped else "every field is known to that version")
        return bad or [ok]
    raise ExportError(f"--target {target}: choose one of {', '.join(TARGETS)}")


def export_peft(folder: Path, out: Path, version: str) -> tuple[Path, list[str]]:
    """A copy of the adapter whose adapter_config.json that peft version constructs."""
    cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    kept, dropped, bad = peft_compat(cfg, version)
    if bad:
        raise ExportError(f"{folder / CONFIG_FILE}: {bad[0].detail}")
    with atomic_dir(out) as tmp:
        for p in folder.iterdir():
            if p.is_file() and p.name != CONFIG_FILE:
                (tmp / p.name).write_bytes(p.read_bytes())
        (tmp / CONFIG_FILE).write_text(json.dumps(kept, indent=2) + "\n", encoding="utf-8")
    return out, dropped
