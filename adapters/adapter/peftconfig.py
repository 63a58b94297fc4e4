"""peft's adapter_config.json, checked before peft sees it, and the weights' header against it.

`read_config` checks every field this package or peft acts on (types, ranges; a rank is
refused before anything is allocated), and every pattern peft would hand to Python's
backtracking `re`: `target_modules` / `exclude_modules` given as one string are compiled for
bounded matching (patterns.py), the names peft turns into regular expressions elsewhere
(`rank_pattern` keys, `modules_to_save`, `layers_pattern`) must be plain module names.
`tensor_problems` checks the safetensors header (names, floating dtypes, shapes against the
rank) without reading a tensor. `for_peft` gives peft a config whose patterns are resolved
into plain module names, so peft never runs a pattern from a file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterFileError
from .patterns import compile_pattern, select
from .schema import parse, read_json

CONFIG_FILE = "adapter_config.json"
MAX_RANK = 1 << 14  # far above any LoRA in use; lora_A alone is r x in_features
MAX_ALPHA = 1e6  # alpha / r scales the update: beyond this it overflows, it does not adapt
MAX_LAYERS = 1 << 16
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the floating dtypes
_PLAIN = re.compile(r"\^?[A-Za-z0-9_][A-Za-z0-9_.\-]*\$?")  # a module name or dotted path
# peft's key layout: <module path>.lora_A.weight, .lora_embedding_B, .lora_magnitude_vector
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|"
                       r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.weight)?$")


@dataclass
class PeftLoraConfig:
    """The fields of peft's LoraConfig that are checked; the others pass through to peft."""
    peft_type: str
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    base_model_name_or_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's adapter_config.json as a dict, checked; AdapterFileError naming the file
    and the field otherwise."""
    path = Path(folder) / CONFIG_FILE
    data = read_json(path, "not a peft adapter folder (expected adapter_config.json + "
                           "adapter_model.safetensors)")
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: must be a JSON object (peft's LoRA config), got "
                               f"{type(data).__name__}; re-save the adapter with peft")
    fix = "fix it or re-save the adapter with peft"
    cfg = parse(PeftLoraConfig, data, str(path), fix)
    problems = _range_problems(cfg, str(path))
    if problems:
        raise AdapterFileError(f"{path}: {problems[0]}; {fix}")
    return data


def _range_problems(cfg: PeftLoraConfig, source: str) -> list[str]:
    out = []
    if cfg.peft_type != "LORA":
        out.append(f"field 'peft_type' is {cfg.peft_type[:40]!r}; only LORA adapters are read")
    ranks = {"r": cfg.r, **{f"rank_pattern.{k}": v for k, v in cfg.rank_pattern.items()}}
    for where, r in ranks.items():
        if not 1 <= r <= MAX_RANK:
            out.append(f"field '{where}' is {r}; a LoRA rank is an integer in 1..{MAX_RANK}")
    alphas = {"lora_alpha": cfg.lora_alpha,
              **{f"alpha_pattern.{k}": v for k, v in cfg.alpha_pattern.items()}}
    out += [f"field '{k}' is {v}; it must be a number within +-{MAX_ALPHA:g}"
            for k, v in alphas.items() if not (math.isfinite(v) and abs(v) <= MAX_ALPHA)]
    if isinstance(cfg.target_modules, list) and not cfg.target_modules:
        out.append("field 'target_modules' is []: it names no layer to adapt")
    for i in _layers(cfg.layers_to_transform):
        if not 0 <= i < MAX_LAYERS:
            out.append(f"field 'layers_to_transform' holds {i}; a layer index is 0 or more")
    if not 0 <= cfg.lora_dropout < 1:
        out.append(f"field 'lora_dropout' is {cfg.lora_dropout}; it must be in [0, 1)")
    names = {**{f"rank_pattern key {k!r}": k for k in cfg.rank_pattern},
             **{f"alpha_pattern key {k!r}": k for k in cfg.alpha_pattern},
             **{f"modules_to_save {m!r}": m for m in cfg.modules_to_save or []}}
    if cfg.layers_pattern is not None:
        for p in [cfg.layers_pattern] if isinstance(cfg.layers_pattern, str) else \
                cfg.layers_pattern:
            names[f"layers_pattern {p!r}"] = p
    out += [f"{where[:80]} is not a plain module name (peft reads it as a regular "
            "expression; only letters, digits, _ . - are accepted)"
            for where, name in names.items() if not _PLAIN.fullmatch(name)]
    for key in ("target_modules", "exclude_modules"):
        if isinstance(getattr(cfg, key), str):
            compile_pattern(getattr(cfg, key), f"{source}: field '{key}'")
    return out


def _layers(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


def _layer_of(module: str) -> int | None:
    """The decoder layer a module path lies in (its first numeric part), or None."""
    m = _LAYER_INDEX.search(module)
    return int(m[1]) if m else None


def base_problems(config: dict[str, Any], modules: list[str], model) -> list[str]:
    """What in the config contradicts `model` (a base, or a PeftModel around it): layer
    indices it does not have, `fan_in_fan_out` on layers that are not Conv1D (peft would merge
    the update transposed), for the LoRA `modules` the weights hold."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = root.config.get_text_config() if hasattr(root.config, "get_text_config") \
        else root.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    out = [f"field 'layers_to_transform' holds {i}, but the base has {n} layers (0..{n - 1})"
           for i in _layers(config.get("layers_to_transform")) if n and i >= n]
    if config.get("fan_in_fan_out"):
        for module in modules:
            try:
                layer = root.get_submodule(module)
            except AttributeError:
                continue  # a layer the base lacks: the weights' own check says so
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            # a dense nn.Linear stores (out, in); GPT-2's Conv1D (in, out). A quantized layer
            # (bitsandbytes converts Conv1D too) says nothing of the original: not judged.
            if type(layer).__name__ == "Linear" and not hasattr(layer, "nf"):
                out.append(f"field 'fan_in_fan_out' is true, but {module} is a "
                           f"{type(layer).__name__}, not a Conv1D: the update would be "
                           "applied transposed")
                break
    return out


def lora_modules(keys) -> list[str]:
    """The module paths (without peft's prefix) of a state dict's LoRA tensors."""
    return list(dict.fromkeys(m["module"] for k in keys if (m := _LORA_KEY.match(k))))


def targeted(module: str, config: dict[str, Any], source: str = CONFIG_FILE) -> bool:
    """Whether peft would adapt `module` under `config` (a string matched in bounded time)."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return bool(select(targets, [module], f"{source}: field 'target_modules'"))
    return not targets or any(module == t or module.endswith("." + t) for t in targets)


def rank(module: str, config: dict[str, Any]) -> int:
    """The rank peft gives `module`: the first matching rank_pattern key (plain names), or r."""
    for key, r in (config.get("rank_pattern") or {}).items():
        if _key_matches(key, module):
            return int(r)
    return int(config.get("r") or 0)


def _key_matches(key: str, module: str) -> bool:
    """peft's `re.match(rf"(.*\\.)?({key})$", module)` for a plain key ('.' as any char)."""
    body = key.removeprefix("^").removesuffix("$")
    starts = [0] if key.startswith("^") else [0] + [i + 1 for i, c in enumerate(module)
                                                      if c == "."]
    return any(len(module) - s == len(body) and all(
        b == "." or b == m for b, m in zip(body, module[s:])) for s in starts)


def tensor_problems(header: dict[str, tuple[str, tuple]], config: dict[str, Any] | None,
                    source: str = CONFIG_FILE) -> list[str]:
    """What in a weights header ({name: (dtype, shape)}) is not a LoRA tensor of a floating
    dtype, or contradicts the config (rank, pairs, targets)."""
    problems = [f"{k}: dtype {d}, but LoRA weights are floating point ({', '.join(FLOAT_DTYPES)})"
                for k, (d, _) in header.items() if d not in FLOAT_DTYPES]
    if config is not None:
        problems += shape_problems({k: s for k, (_, s) in header.items()}, config, source)
    return problems


def shape_problems(shapes: dict[str, tuple], config: dict[str, Any],
                   source: str = CONFIG_FILE) -> list[str]:
    """What in a peft LoRA state dict contradicts its config (rank, pairs, targets)."""
    modules: dict[str, dict[str, tuple]] = {}
    problems = []
    saved = set(config.get("modules_to_save") or [])  # e.g. a task head, trained in full
    for key, shape in shapes.items():
        m = _LORA_KEY.match(key)
        if m is None and _saved_module(key, saved):
            continue
        if m is None:
            problems.append(f"{key}: not a LoRA tensor name")
            continue
        modules.setdefault(m["module"], {})[m["part"]] = tuple(shape)
    for module, parts in modules.items():
        r = rank(module, config)
        a = parts.get("lora_A") or parts.get("lora_embedding_A")
        b = parts.get("lora_B") or parts.get("lora_embedding_B")
        if a is None or b is None:
            problems.append(f"{module}: has only one of lora_A / lora_B")
            continue
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            problems.append(f"{module}: lora_A {list(a)} and lora_B {list(b)} do not have "
                            f"rank r={r} ([r, in] and [out, r] expected)")
        if not targeted(module, config, source):
            shown = str(config.get("target_modules"))
            problems.append(f"{module}: not among target_modules {shown[:80]}")
        wanted = _layers(config.get("layers_to_transform"))
        if wanted and _layer_of(module) not in wanted:
            problems.append(f"{module}: in a layer outside layers_to_transform {wanted[:8]}")
        mag = parts.get("lora_magnitude_vector")
        if mag is not None and tuple(mag) != (b[0],):
            problems.append(f"{module}: DoRA magnitude {list(mag)} but {b[0]} outputs")
    return problems


def _saved_module(key: str, saved: set[str]) -> bool:
    """Whether `key` is a weight or bias of a `modules_to_save` module (peft saves it whole)."""
    module, _, leaf = key.rpartition(".")
    return leaf in ("weight", "bias") and module.rpartition(".")[2] in saved


def for_peft(folder: str | Path, base) -> Any:
    """A peft LoraConfig for the adapter in `folder`, checked, with any string pattern
    replaced by the names of `base`'s modules it matches (found in bounded time), or None
    when the config has no pattern and peft can read it as it is."""
    config = read_config(folder)
    patterns = [k for k in ("target_modules", "exclude_modules")
                if isinstance(config.get(k), str)]
    if not patterns:
        return None
    # Imported here: peft's config classes are only needed for this rare case.
    from peft import PeftConfig

    peft_config = PeftConfig.from_pretrained(str(folder))
    names = [n for n, _ in base.named_modules() if n]
    for key in patterns:
        found = select(config[key], names, f"{Path(folder) / CONFIG_FILE}: field '{key}'")
        setattr(peft_config, key, set(found))
    return peft_config
