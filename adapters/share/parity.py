"""A parity certificate: the same adapter, the same prompts, every runtime installed here.

The reference is plain peft on transformers with the base in fp32 (what the adapter's numbers
mean). Its greedy continuation of each prompt (`new` tokens, stopping at EOS) is the reference
continuation. Every runtime then runs the same token ids (our tokenizer, no special tokens
added), and two figures are taken against the reference:
  top-1 / KL   teacher-forced on prompt + reference continuation: at each continuation
               position, whether the runtime's argmax is the reference's, and KL(ref || it)
  greedy       the fraction of prompts whose own greedy continuation equals the reference's
Runtimes: `adapters` (the registry's batched LoRA, one adapter per batch), `adapters-mixed`
(the same rows, each beside a row of the plain base in one mixed batch), `merged` (the adapter
merged into the full-precision base), `merged-4bit` / `merged-8bit` (that merge loaded
quantized as the adapter was trained, for a QLoRA adapter), `llama.cpp` (the LoRA GGUF
`adapters export` writes, on the base's GGUF, in llama.cpp's prebuilt runtime). Ollama and
vLLM are listed as skipped with the reason when they are not here.

Thresholds (PASS_AT): runtimes of the reference's precision must agree on >= 99% of next
tokens and >= 95% of greedy continuations; quantized ones have bounds on top-1 and KL set from
the demo's adapters (README), their greedy agreement is reported. A failing runtime names the
first prompt whose continuation diverges, both continuations, and the likely cause where one
is known (a LoRA tensor the runtime does not hold, for llama.cpp).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
import peft
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open
from transformers import GenerationConfig

from ..adapter import WEIGHTS_FILE, open_with_base, write_manifest
from ..adapter.archive import is_archive
from ..adapter.sections import ParityInfo, ParityRow
from ..config import ModelConfig, from_dict
from ..data.prompts import build_prompts
from ..data.sources import read_rows
from ..errors import AdaptersError, DataError
from ..generation.decode import Request, Sampling
from ..merge import SAMPLE_TEXT, merge_adapter
from ..model import load_base, load_tokenizer, resolve_model_path
from ..serving.registry import Registry
from .export import base_gguf_for, export
from .gguf_io import ExportError
from .llama_runtime import have_llama_cpp, llama_cpp_greedy, llama_cpp_logits, runtime_name
from .runtime_check import agreement

log = logging.getLogger(__name__)

RUNTIMES = ("adapters", "adapters-mixed", "merged", "merged-quantized", "llama.cpp", "ollama",
            "vllm")
# runtime kind -> (top-1 at least, greedy agreement at least, mean KL at most). A quantized
# runtime's greedy continuation leaves the reference's at its first rounding difference, so
# only its next-token figures are held to a bound (from the demo adapters, README).
PASS_AT = {"same": (0.99, 0.95, 0.01), "llama.cpp": (0.95, 0.0, 0.05),
           "quantized": (0.75, 0.0, 0.5)}


@dataclass
class Case:
    """The prompts and what the reference made of them."""

    prompts: list[list[int]]
    greedy: list[list[int]] = field(default_factory=list)  # reference greedy, EOS not included
    continuations: list[list[int]] = field(default_factory=list)  # + EOS when it stopped
    logits: list[np.ndarray] = field(default_factory=list)  # reference, continuation positions

    def teacher(self) -> list[list[int]]:
        """prompt + continuation: what every runtime is teacher-forced on."""
        return [p + c for p, c in zip(self.prompts, self.continuations)]


def _cut(logits: np.ndarray, prompt: int, cont: int) -> np.ndarray:
    """The rows of a sequence's logits (T, V) that predict its continuation's tokens."""
    return logits[prompt - 1:prompt - 1 + cont]


def _until_eos(ids: list[int], eos: set[int], n: int) -> list[int]:
    out = []
    for t in ids[:n]:
        if t in eos:
            break
        out.append(t)
    return out


CHUNK = 8  # sequences per forward: a (8, T, V) block of fp32 logits at most


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


@torch.no_grad()
def _hf_greedy(model, tok, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Each prompt's greedy continuation (EOS not included) from `generate`, CHUNK prompts
    at a time, left-padded with the attention mask."""
    out = []
    for s in range(0, len(prompts), CHUNK):
        part = prompts[s:s + CHUNK]
        width = max(len(p) for p in part)
        ids = torch.tensor([[_pad_id(tok)] * (width - len(p)) + p for p in part])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
        # plain argmax, stopping at the tokenizer's EOS as the other runtimes do (not the
        # model's generation_config: a repetition penalty or extra stop ids would differ)
        plain = GenerationConfig(do_sample=False, max_new_tokens=new, num_beams=1,
                                 eos_token_id=tok.eos_token_id, pad_token_id=_pad_id(tok))
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=plain)
        out += [gen[i, width:].tolist() for i in range(len(part))]
    return out


@torch.no_grad()
def _hf_logits(forward, case: Case, pad: int) -> list[np.ndarray]:
    """Teacher-forced logits at the continuation positions; `forward(ids, mask)` returns the
    (B, T, V) logits of right-padded rows."""
    out = []
    seqs = case.teacher()
    for s in range(0, len(seqs), CHUNK):
        part, prompts = seqs[s:s + CHUNK], case.prompts[s:s + CHUNK]
        width = max(len(q) for q in part)
        ids = torch.tensor([q + [pad] * (width - len(q)) for q in part])
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in part])
        logits = forward(ids, mask).float()
        out += [_cut(logits[i].numpy(), len(p), len(q) - len(p))
                for i, (p, q) in enumerate(zip(prompts, part))]
    return out


def _hf_side(model, tok, case: Case, new: int) -> tuple[list[np.ndarray], list[list[int]]]:
    """Teacher-forced logits and greedy continuations of a transformers model (peft or not)."""
    eos = {tok.eos_token_id} - {None}
    logits = _hf_logits(lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits,
                        case, _pad_id(tok))
    greedy = [_until_eos(g, eos, new) for g in _hf_greedy(model, tok, case.prompts, new)]
    return logits, greedy


def reference(folder: Path, spec: str, case: Case, new: int) -> object:
    """Fill `case` from plain peft on the fp32 base; returns the tokenizer."""
    model, tok = load_base(ModelConfig(name=spec, dtype="fp32"), device="cpu")
    model = PeftModel.from_pretrained(model, str(folder)).eval()
    for gen in _hf_greedy(model, tok, case.prompts, new):
        got = _until_eos(gen, {tok.eos_token_id} - {None}, new)
        case.greedy.append(got)
        case.continuations.append(gen[:len(got) + 1] if len(got) < len(gen) else got)
    case.logits, _ = _hf_side(model, tok, case, new)
    return tok


def _registry_side(spec: str, folder: Path, case: Case, new: int, mixed: bool):
    """The registry's batched LoRA; mixed: each row beside a row of the plain base."""
    model, tok = load_base(ModelConfig(name=spec, dtype="fp32"), device="cpu")
    reg = Registry(model, tok, capacity=1)
    reg.load("a", folder)

    def forward(ids, mask):  # (B, T) -> the adapter rows' (B, T, V) logits
        rows = [Request(r.tolist(), "a") for r in ids]
        if mixed:  # the base on a second copy of each row, in the same batch
            rows += [Request(r.tolist(), None) for r in ids]
            ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])
        return reg.forward(rows, input_ids=ids, attention_mask=mask).logits[:len(rows) // (
            2 if mixed else 1)]

    logits = _hf_logits(forward, case, _pad_id(tok))
    reqs = []
    for p in case.prompts:  # greedy, one batch for all
        reqs.append(Request(p, "a", Sampling(max_new_tokens=new)))
        if mixed:
            reqs.append(Request(p, None, Sampling(max_new_tokens=new)))
    outs = reg.run(reqs)[::2 if mixed else 1]
    return logits, [o.token_ids for o in outs]


def _merged_side(merged: Path, case: Case, new: int, quant: str | None):
    """The merged model folder loaded as it is (fp32) or quantized again like the adapter."""
    cfg = ModelConfig(name=str(merged), dtype="fp32") if quant is None else ModelConfig(
        name=str(merged), quantization=quant, dtype="fp32")
    model, tok = load_base(cfg, device="cpu")
    return _hf_side(model.eval(), tok, case, new)


def _llama_side(folder: Path, spec: str, case: Case, new: int):
    """(logits, greedy, LoRA pairs the exported file lacks) of the LoRA GGUF in llama.cpp."""
    with tempfile.TemporaryDirectory(prefix="adapters-parity-") as tmp:
        lora = Path(tmp) / "adapter.gguf"
        export(folder, "gguf-lora", lora, base=spec, verify=False)
        lacking = missing_in_gguf(folder, lora)
        with base_gguf_for(folder, spec) as base:
            seqs = case.teacher()
            full = llama_cpp_logits(base, seqs, lora=lora)
            logits = [_cut(x, len(p), len(s) - len(p)) for x, p, s in zip(full, case.prompts,
                                                                          seqs)]
            greedy = llama_cpp_greedy(base, case.prompts, new, lora=lora)
    return logits, greedy, lacking


# HF projection -> llama.cpp tensor, written out here apart from the exporter's own map
# (gguf's TensorNameMap) so that a fault in that map shows instead of being checked by itself
_GGUF_KIND = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
              "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
              "down_proj": "ffn_down", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def missing_in_gguf(folder: Path, lora_gguf: Path) -> list[str]:
    """The adapter's LoRA modules with no `blk.N.<kind>.weight.lora_a` in the LoRA GGUF."""
    have = {t.name for t in gguf.GGUFReader(lora_gguf).tensors}
    with safe_open(folder / WEIGHTS_FILE, "pt") as f:
        modules = [k[:-len(".lora_A.weight")] for k in f.keys() if k.endswith(".lora_A.weight")]
    out = []
    for m in modules:
        layer = re.search(r"\.(\d+)\.", m)
        kind = next((v for k, v in _GGUF_KIND.items() if m.endswith("." + k)), None)
        if layer and kind and f"blk.{layer.group(1)}.{kind}.weight.lora_a" not in have:
            out.append(m.removeprefix("base_model.model."))
    return out


def _row(name: str, version: str, precision: str, kind: str, case: Case, logits, greedy,
         tok, note: str = "") -> ParityRow:
    agree = agreement(case.logits, logits)
    same = [g == c for g, c in zip(greedy, case.greedy)]
    top1_min, greedy_min, kl_max = PASS_AT[kind]
    greedy_rate = sum(same) / max(len(same), 1)
    passed = agree.top1 >= top1_min and greedy_rate >= greedy_min and agree.mean_kl <= kl_max
    if not passed and not all(same):
        i = same.index(False)
        note = (f"{note + '; ' if note else ''}first divergence: prompt {i} "
                f"{tok.decode(case.prompts[i])[-60:]!r}: reference "
                f"{tok.decode(case.greedy[i])[:80]!r}, {name} "
                f"{tok.decode(greedy[i])[:80]!r}")
    return ParityRow(name, version, precision, round(agree.top1, 4), round(agree.mean_kl, 6),
                     round(greedy_rate, 4), passed, f">= {top1_min:.0%} top-1, KL <= {kl_max:g}"
                     + (f", >= {greedy_min:.0%} greedy" if greedy_min else ""), note)


def certify(adapter: str | Path, base: str | None, prompts: list[str], new: int = 64,
            runtimes: tuple[str, ...] = RUNTIMES) -> ParityInfo:
    """The certificate of `adapter` over `prompts` (texts) on each runtime of `runtimes`."""
    if not prompts:
        raise ExportError("parity: no prompts to compare on (give --prompts or --data)")
    folder, manifest, spec = open_with_base(adapter, base)
    tok0 = load_tokenizer(resolve_model_path(spec))
    case = Case([tok0(t, add_special_tokens=False)["input_ids"] or [tok0.eos_token_id]
                 for t in prompts])
    tok = reference(folder, spec, case, new)
    rows = [ParityRow("peft (reference)", f"peft {peft.__version__}", "fp32", 1.0, 0.0, 1.0,
                      True, "")]
    skipped: dict[str, str] = {}
    quant = manifest.quantization.quantization if manifest and manifest.quantized else None
    work = tempfile.TemporaryDirectory(prefix="adapters-parity-")
    merged: list[Path] = []

    def merge() -> Path:  # one merge (into the original weights) for both merged rows
        if not merged:
            merged.append(merge_adapter(folder, Path(work.name) / "merged", base=spec,
                                        against="original", verify=False)[0])
        return merged[0]

    plan = {
        "adapters": lambda: _row("adapters", _version(), "fp32", "same", case,
                                 *_registry_side(spec, folder, case, new, False), tok),
        "adapters-mixed": lambda: _row("adapters-mixed", _version(), "fp32", "same", case,
                                       *_registry_side(spec, folder, case, new, True), tok),
        "merged": lambda: _row("merged", _transformers(), "fp32", "same", case,
                               *_merged_side(merge(), case, new, None), tok),
        "merged-quantized": lambda: _row(
            f"merged-{quant}", _transformers(), quant, "quantized", case,
            *_merged_side(merge(), case, new, quant), tok,
            "the merge quantized again, as the adapter was trained"),
        "llama.cpp": lambda: _llama_row(folder, spec, case, new, tok),
    }
    with work:
        rows += _run_all(plan, runtimes, quant, skipped)
    return ParityInfo(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      len(case.prompts), new, rows, skipped)


def _run_all(plan: dict, runtimes: tuple[str, ...], quant: str | None,
             skipped: dict[str, str]) -> list[ParityRow]:
    rows = []
    for name in runtimes:
        why = _unavailable(name, quant)
        if why:
            skipped[name] = why
            continue
        log.info("parity: %s", name)
        try:
            rows.append(plan[name]())
        except AdaptersError as e:  # refused: the runtime cannot take this adapter as it is
            rows.append(ParityRow(name, "", "", 0.0, -1.0, 0.0, False, "",
                                  f"could not run: {e}"))
    return rows


def _llama_row(folder: Path, spec: str, case: Case, new: int, tok) -> ParityRow:
    try:
        logits, greedy, lacking = _llama_side(folder, spec, case, new)
    except ExportError as e:
        return ParityRow("llama.cpp", runtime_name(), "gguf", 0.0, -1.0, 0.0, False, "",
                         f"could not run: {e}")
    row = _row("llama.cpp", runtime_name(), "gguf (the base's GGUF + the LoRA GGUF)",
               "llama.cpp", case, logits, greedy, tok)
    if lacking:  # a LoRA pair the runtime never applies fails whatever the figures say
        row.passed = False
        row.note = (f"the LoRA GGUF lacks {len(lacking)} of the adapter's LoRA modules, e.g. "
                    f"{', '.join(lacking[:3])}: the export dropped them; {row.note}").rstrip("; ")
    return row


def prompts_for(adapter: str | Path, tok, n: int = 32, data: str | None = None,
                prompts_file: str | None = None) -> tuple[list[str], str]:
    """(up to n prompt texts, where they came from): a file of prompts (one per line, or
    JSONL with `prompt`), a data file in the adapter's recipe format, the eval split its
    manifest names, or a few sample texts."""
    if prompts_file:
        lines = [ln for ln in Path(prompts_file).read_text(encoding="utf-8").splitlines()
                 if ln.strip()]
        texts = [json.loads(ln)["prompt"] if prompts_file.endswith(".jsonl") else ln
                 for ln in lines]
        return texts[:n], prompts_file
    folder, manifest, _ = open_with_base(adapter, None)
    recipe = manifest.recipe if manifest is not None else None
    if recipe:
        cfg = from_dict(recipe, f"{folder}/manifest.json recipe")
        source = data or cfg.data.eval
        if source and cfg.data.format == "text":  # a document's opening as the prompt
            rows = read_rows(source, cfg.data.text_unit)[0][:n]
            texts = [tok.decode(tok(str(r.data.get((cfg.data.columns or {}).get("text", "text"))
                                        or ""), add_special_tokens=False)["input_ids"][:32])
                     for r in rows]
            return [t for t in texts if t.strip()], str(source)
        if source:
            cfg.data.train, cfg.data.eval = source, None
            try:
                found = build_prompts(cfg.data, tok, 0)[0].prompts
                return [p.text for p in found[:n]], str(source)
            except DataError as e:
                log.warning("parity: the eval prompts are not readable (%s): sample texts", e)
    return list(SAMPLE_TEXT)[:n], "sample texts"


def record(adapter: str | Path, info: ParityInfo) -> bool:
    """The certificate into the adapter folder's manifest and card (not into a .zip, which
    stays as received); whether it was written."""
    if is_archive(adapter):
        return False
    folder, manifest, _ = open_with_base(adapter, None)
    if manifest is None:
        return False
    manifest.parity = info
    write_manifest(folder, manifest)
    return True


def _unavailable(name: str, quant: str | None) -> str | None:
    """Why a runtime is skipped here (None when it runs)."""
    if name == "merged-quantized" and quant is None:
        return "the adapter was trained on a full-precision base"
    if name == "llama.cpp" and not have_llama_cpp():
        return "llama.cpp's runtime is not installed (scripts/setup installs it)"
    if name == "ollama":
        return "Ollama is not installed here" if shutil.which("ollama") is None else \
            "not yet checked automatically: run the Modelfile `adapters export --to ollama` writes"
    if name == "vllm":
        return "vLLM needs a CUDA GPU and the vllm package" if not torch.cuda.is_available() \
            else "not yet checked automatically"
    if name not in RUNTIMES:
        return f"unknown runtime (known: {', '.join(RUNTIMES)})"
    return None


def _version() -> str:
    return f"adapterkit {version('adapterkit')}"


def _transformers() -> str:
    return f"transformers {transformers.__version__}"
