"""Fold an adapter into its base (checked), stream-merge safetensors, combine adapters.

Merging goes wrong silently elsewhere, most often after QLoRA: the adapter learned a
correction to the *4-bit* weights, and merging it into the original weights gives another
model. So `against="dequantized"` merges into the nf4-dequantized weights training saw, and
every merge is verified: base + adapter and the merged model run on held-out text, and the
max logit difference, mean KL and both perplexities decide whether anything is written.

Both paths, in memory (`merge_adapter`) and tensor by tensor from the base's shards
(`merge_streaming_verified`), open the adapter the same way (`_open`: an archive unpacked once,
its files and manifest checked), check the base's fingerprint the same way (honouring
`allow_base_mismatch`) and verify with the same reference and the same limits (`_verify`).

A task-head adapter (classification, regression) merges in memory into the base loaded with
its head, and is checked on the head's outputs (merge_heads.py); streaming refuses it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from .adapter import (
    WEIGHTS_FILE,
    Manifest,
    check_base,
    check_files,
    load_adapter,
    open_with_base,
    read_base_name,
)
from .adapter.archive import resolve_adapter
from .adapter.peftconfig import read_config
from .config import ModelConfig
from .errors import AdaptersError
from .heads import refuse_task_head, task_of
from .io import atomic_dir, check_out_folder
from .merge_heads import HeadVerification, compare_heads, load_head_base
from .model import exact_4bit_on_cpu, load_base, resolve_dtype, resolve_model_path

__all__ = ["AGAINST", "HeadVerification", "MergeError", "Verification", "compare_models",
           "merge_adapter", "merge_streaming", "merge_streaming_verified", "read_base_name"]

log = logging.getLogger(__name__)

SAMPLE_TEXT = [  # built-in held-out text when no --data is given
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "import json\nwith open('data.json') as f:\n    data = json.load(f)\nprint(len(data))\n",
]


# Streaming would have to rename the causal LM's tensors, add the head and rewrite the config:
# task heads take the in-memory path, which builds the *ForSequenceClassification model.
_IN_MEMORY = "leave out --stream (the in-memory merge writes them)"

# What an adapter trained on a 4/8-bit base is merged into: the dequantized weights training
# saw (the default), or the original full-precision ones.
AGAINST = ("dequantized", "original")


class MergeError(AdaptersError):
    """A merge that did not reproduce base + adapter closely enough; nothing was written."""


@dataclass
class Verification:
    max_logit_diff: float
    mean_kl: float
    ppl_reference: float
    ppl_merged: float
    worst_layer: str | None = None

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class _Source:
    """An adapter ready to merge: its folder (an archive already unpacked), its checked
    manifest (None for a plain peft folder), the base spec to merge into and its task
    section (None for a causal-LM adapter)."""
    folder: Path
    manifest: Manifest | None
    spec: str
    task: dict | None = None

    def load(self, cfg: ModelConfig):
        """(model, tokenizer) on CPU: the causal LM, or the base with a head of the adapter's
        shape for a task-head adapter."""
        if self.task is None:
            return load_base(cfg, device="cpu")
        return load_head_base(self.task, cfg)

    def as_trained(self) -> ModelConfig:
        """The base as training saw it (quantized or not), in fp32: the reference's base."""
        if self.manifest is None or self.manifest.quantization is None:
            return ModelConfig(name=self.spec, dtype="fp32")
        q = self.manifest.quantization
        return ModelConfig(name=self.spec, quantization=q.quantization, quant_type=q.quant_type,
                           double_quant=q.double_quant, dtype="fp32")


def _open(adapter: str | Path, base: str | None) -> _Source:
    folder, manifest, spec = open_with_base(adapter, base)
    return _Source(folder, manifest, spec, task_of(manifest))


def _dequantize_into(full, quant: ModelConfig) -> int:
    """Replace `full`'s linear weights by their 4/8-bit round trip, as training saw them.

    Loads the same base quantized the way the manifest says, dequantizes each bitsandbytes
    layer and copies the result into the full-precision model. Returns the count replaced.
    """
    # Imported here: only quantized adapters need it, and its import logs a kernel warning.
    import bitsandbytes as bnb

    qmodel, _ = load_base(dataclasses.replace(quant, dtype="fp32"), device="cpu")
    full_modules = dict(full.named_modules())
    n = 0
    for name, m in qmodel.named_modules():
        if name not in full_modules:  # a task-head model has no lm_head (its head stays fp)
            continue
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        elif isinstance(m, bnb.nn.Linear8bitLt):
            cb, scb = m.weight.data, m.weight.SCB
            w = cb.float() * scb.float()[:, None] / 127.0
        else:
            continue
        target = full_modules[name].weight
        if isinstance(full_modules[name], Conv1D):
            w = w.T  # bitsandbytes holds (out, in); GPT-2's Conv1D stores (in, out)
        with torch.no_grad():
            target.copy_(w.to(target.dtype))
        n += 1
    del qmodel
    return n


def _texts(tokenizer, data: list[str] | None, max_len: int = 128) -> list[torch.Tensor]:
    return [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_len]
            for t in (data or SAMPLE_TEXT) if t.strip()]


@torch.no_grad()
def compare_models(ref, merged, batches: list[torch.Tensor]) -> Verification:
    """Logit difference, KL(ref || merged), perplexities, and the layer that differs most."""
    max_diff, kl_sum, n_tok, nll_r, nll_m = 0.0, 0.0, 0, 0.0, 0.0
    layer_diff: dict[int, float] = {}
    for ids in batches:
        a = ref(ids, output_hidden_states=True)
        b = merged(ids, output_hidden_states=True)
        la, lb = a.logits.float()[0], b.logits.float()[0]  # (T, V)
        diff = float((la - lb).abs().max())  # NaN when either side is not finite
        max_diff = diff if diff != diff or diff > max_diff else max_diff
        pa, pb = F.log_softmax(la, -1), F.log_softmax(lb, -1)
        kl_sum += float((pa.exp() * (pa - pb)).sum())
        n_tok += la.shape[0]
        target = ids[0, 1:]
        nll_r += float(F.cross_entropy(la[:-1], target, reduction="sum"))
        nll_m += float(F.cross_entropy(lb[:-1], target, reduction="sum"))
        for i, (ha, hb) in enumerate(zip(a.hidden_states, b.hidden_states)):
            rel = float((ha - hb).norm() / ha.norm().clamp_min(1e-12))
            layer_diff[i] = max(layer_diff.get(i, 0.0), rel)
    n_pred = max(n_tok - len(batches), 1)
    worst = max(layer_diff, key=layer_diff.get) if layer_diff else None
    return Verification(max_diff, kl_sum / max(n_tok, 1), float(torch.tensor(nll_r / n_pred).exp()),
                        float(torch.tensor(nll_m / n_pred).exp()),
                        None if worst is None else f"hidden state {worst} "
                        f"(relative difference {layer_diff[worst]:.2e})")


def _verify(src: _Source, merged, data: list[str] | None, max_kl: float,
            allow_base_mismatch: bool, reference: ModelConfig,
            max_diff: float = 0.01) -> Verification | HeadVerification:
    """Compare `merged` with `reference` base + adapter; MergeError (nothing written) when the
    mean KL exceeds `max_kl` or any logit is not finite (for a regression head: when the
    value moves by more than `max_diff`). The base's fingerprint is checked on the reference
    too, so a streamed merge gets the same check as an in-memory one."""
    ref_base, tok = src.load(reference)
    check_base(src.manifest, ref_base, tok, src.folder, allow_base_mismatch)
    exact_4bit_on_cpu(ref_base)
    ref = load_adapter(ref_base, src.folder).eval()
    if src.task is not None:
        heads = compare_heads(ref, merged.eval(), _texts(tok, data), src.task)
        log.info("verification: %s", heads.as_dict())
        problem = heads.problem(max_kl, max_diff)
        if problem is not None:
            raise MergeError(f"{src.folder}: the merged model's head departs from base + "
                             f"adapter ({problem}). Nothing was written.")
        return heads
    result = compare_models(ref, merged.eval(), _texts(tok, data))
    log.info("verification: %s", result.as_dict())
    # `not <=` and the self-comparison also catch NaN, which every comparison calls False.
    if not result.mean_kl <= max_kl or result.max_logit_diff != result.max_logit_diff:
        raise MergeError(f"{src.folder}: the merged model departs from base + adapter (mean KL "
                         f"{result.mean_kl:.4g} > {max_kl}, max logit difference "
                         f"{result.max_logit_diff:.4g}); most different: "
                         f"{result.worst_layer}. Nothing was written.")
    return result


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None,
                  dtype: str = "fp32", against: str = "dequantized", verify: bool = True,
                  data: list[str] | None = None, max_kl: float = 0.05,
                  allow_base_mismatch: bool = False, max_diff: float = 0.01
                  ) -> tuple[Path, Verification | HeadVerification | None]:
    """Write base + adapter as one full model folder that plain transformers loads.

    against: for an adapter trained on a 4/8-bit base, "dequantized" merges into the
    dequantized weights it was trained against, "original" into the full-precision ones.
    The reference for verification is the base as trained (quantized or not) + adapter.
    A task-head adapter gives a `*ForSequenceClassification` folder, checked on its head's
    outputs (KL of the class probabilities; `max_diff` of the value for regression).
    """
    check_out_folder(out)  # before minutes of merging, not after
    src = _open(adapter, base)
    # Merge and verify in fp32; cast to the requested dtype only when writing.
    model, tok = src.load(ModelConfig(name=src.spec, dtype="fp32"))
    check_base(src.manifest, model, tok, src.folder, allow_base_mismatch)
    if src.manifest is not None and src.manifest.quantized and against == "dequantized":
        log.info("merging into the dequantized %s weights (%d layers)",
                 src.manifest.quantization.quantization,
                 _dequantize_into(model, src.as_trained()))
    merged = load_adapter(model, src.folder).merge_and_unload()
    result = (_verify(src, merged, data, max_kl, allow_base_mismatch, src.as_trained(),
                      max_diff) if verify else None)
    merged = merged.to(resolve_dtype(dtype))
    _write_model(merged, tok, src.spec, Path(out))
    return Path(out), result


def _write_model(model, tok, spec: str, out: Path) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tok.save_pretrained(tmp)
        src = Path(resolve_model_path(spec))
        if (src / "generation_config.json").is_file() and not (
                tmp / "generation_config.json").exists():
            shutil.copy(src / "generation_config.json", tmp / "generation_config.json")


def _lora_deltas(adapter: Path) -> tuple[dict[str, tuple], float, bool]:
    """{base weight name: (A, B)}, scaling, fan_in_fan_out from a peft LoRA folder."""
    cfg = read_config(adapter)
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdaptersError(f"{adapter}: DoRA and per-module ranks need the in-memory merge "
                            "(leave out --stream)")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    weights = load_file(adapter / WEIGHTS_FILE)
    pairs = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            pairs[module + ".weight"] = (a, weights[key.replace("lora_A", "lora_B")])
    return pairs, scaling, bool(cfg.get("fan_in_fan_out"))


def merge_streaming(base_folder: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Merge tensor by tensor from the base's safetensors shards, never building the model.

    Peak memory is about the largest shard plus the adapter. The arithmetic is the in-memory
    merge's (fp32: W + transpose(B @ A) * scaling), so both give the same bits. Not verified:
    `merge_streaming_verified` is the checked path.
    """
    folder = resolve_adapter(adapter)
    refuse_task_head(check_files(folder), folder, "adapters merge --stream", _IN_MEMORY)
    return _stream(Path(base_folder), folder, Path(out))


def _stream(base_folder: Path, adapter: Path, out: Path) -> Path:
    pairs, scaling, fan_in_fan_out = _lora_deltas(adapter)
    shards = sorted(base_folder.glob("*.safetensors"))
    if not shards:
        raise AdaptersError(f"{base_folder}: no .safetensors files to stream from")
    done = set()
    with atomic_dir(out) as tmp:
        for shard in shards:
            tensors = {}
            with safe_open(shard, "pt") as f:
                meta = f.metadata()
                for name in f.keys():
                    t = f.get_tensor(name)
                    if name in pairs:
                        a, b = pairs[name]
                        delta = b.float() @ a.float()  # (out, in)
                        delta = (delta.T if fan_in_fan_out else delta) * scaling
                        t = (t.float() + delta).to(t.dtype)
                        done.add(name)
                    tensors[name] = t
            save_file(tensors, tmp / shard.name, metadata=meta)
            del tensors
        missing = set(pairs) - done
        if missing:
            raise AdaptersError(f"{adapter}: {len(missing)} adapted weights are not in "
                                f"{base_folder} (e.g. {sorted(missing)[0]}): another base?")
        for p in base_folder.iterdir():
            if p.is_file() and p.suffix != ".safetensors":
                shutil.copy(p, tmp / p.name)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    log.info("streamed %d shards, merged %d weights into %s", len(shards), len(done), out)
    return out


def merge_streaming_verified(adapter: str | Path, out: str | Path, base: str | None = None,
                             verify: bool = True, data: list[str] | None = None,
                             max_kl: float = 0.05, allow_base_mismatch: bool = False
                             ) -> tuple[Path, Verification | None]:
    """Streaming merge into a temporary folder, checked like `merge_adapter`, then moved
    into place. Without `verify` no model is built, so the base's fingerprint goes unchecked
    (a base with other tensor names still fails: every adapted weight must be found)."""
    src = _open(adapter, base)
    refuse_task_head(src.manifest, src.folder, "adapters merge --stream", _IN_MEMORY)
    if src.manifest is not None and src.manifest.quantized:
        log.warning("%s: trained on a %s base; streaming merges into the original weights "
                    "(the in-memory merge can use the dequantized ones)", src.folder,
                    src.manifest.quantization.quantization)
    out = Path(out)
    with atomic_dir(out) as tmp:
        _stream(Path(resolve_model_path(src.spec)), src.folder, tmp / "m")
        result = None
        if verify:
            merged = AutoModelForCausalLM.from_pretrained(tmp / "m", dtype=torch.float32)
            # The streamed merge writes the original weights + delta: its reference is the
            # full-precision base + adapter (the arithmetic is what is checked here).
            result = _verify(src, merged, data, max_kl, allow_base_mismatch,
                             ModelConfig(name=src.spec, dtype="fp32"))
            del merged
        for p in (tmp / "m").iterdir():
            p.rename(tmp / p.name)
        (tmp / "m").rmdir()
    return out, result
