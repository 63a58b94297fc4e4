"""`adapters export`: an adapter in the form other runtimes load, checked in llama.cpp itself.

  gguf-lora  the adapter as a llama.cpp LoRA GGUF, applied at load time to the base GGUF
  gguf       base + adapter merged into one GGUF (f32 | f16 | bf16 | q8_0)
  ollama     a folder: Modelfile (FROM base GGUF, ADAPTER LoRA GGUF, TEMPLATE, stops) + files
  peft       a copy whose adapter_config.json an older peft constructs (--peft-version)

The GGUF writer needs no llama.cpp, so the files are always written. Where llama.cpp's runtime
is installed (llama_runtime.py; `scripts/setup` installs it), every GGUF is loaded by llama.cpp
before it is kept: its next-token distributions on held-out text are compared with base +
adapter in `adapters` (top-1 agreement and mean KL, next to the same figures for the base
alone), and a mean KL above `max_kl`, or an adapter whose effect does not show in llama.cpp,
fails the export with nothing written. Without the runtime the result says it was not checked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter import Manifest, load_adapter, open_with_base
from ..config import ModelConfig
from ..io import atomic_dir, atomic_write_text, check_out_file, check_out_folder
from ..merge import SAMPLE_TEXT, merge_adapter
from ..model import (
    DEFAULT_NAME,
    _gguf_path,
    load_base,
    load_tokenizer,
    resolve_model_path,
)
from .gguf_base import write_hf_gguf
from .gguf_io import OUT_TYPES, ExportError, atomic_gguf
from .gguf_lora import write_lora_gguf, write_merged_from_gguf
from .llama_runtime import INSTALL_HINT, have_llama_cpp, llama_cpp_logits, runtime_name
from .ollama import modelfile, stop_tokens, template_parts
from .runtime_check import RuntimeReport, compare, gate, torch_logits
from .targets import export_peft

__all__ = ["FORMATS", "ExportError", "ExportResult", "export"]

log = logging.getLogger(__name__)

FORMATS = ("gguf-lora", "gguf", "ollama", "peft")
DEFAULT_MAX_KL = 0.05


@dataclass
class ExportResult:
    out: Path
    files: list[Path] = field(default_factory=list)
    report: RuntimeReport | None = None
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Adapter:
    folder: Path
    manifest: Manifest | None
    spec: str


def _open(adapter: str | Path, base: str | None) -> _Adapter:
    return _Adapter(*open_with_base(adapter, base))


@contextlib.contextmanager
def _base_gguf(src: _Adapter, base_gguf: str | Path | None) -> Iterator[Path]:
    """The base as a GGUF file: given, the embedded default's, or written from the HF folder."""
    if base_gguf is not None:
        yield Path(base_gguf)
    elif src.spec == DEFAULT_NAME:
        yield _gguf_path()
    else:
        with tempfile.TemporaryDirectory(prefix="adapters-gguf-") as tmp:
            yield write_hf_gguf(resolve_model_path(src.spec), Path(tmp) / "base.gguf", "f32")


@contextlib.contextmanager
def base_gguf_for(adapter: str | Path, base: str | None = None) -> Iterator[Path]:
    """The GGUF of the adapter's base (the embedded default's, or one written from the HF
    folder for as long as the context lasts)."""
    with _base_gguf(_open(adapter, base), None) as path:
        yield path


def _prompts(tok, data: list[str] | None, max_len: int = 96) -> list[list[int]]:
    ids = [tok(t, add_special_tokens=False)["input_ids"][:max_len] for t in data or SAMPLE_TEXT]
    return [i for i in ids if len(i) >= 2]


def runtime_report(src: _Adapter, base_gguf: Path, exported: Path, lora: bool,
                   data: list[str] | None = None) -> RuntimeReport:
    """llama.cpp (base GGUF [+ LoRA GGUF] or the merged GGUF) against ours, same token ids.

    Ours is the full-precision base + adapter, even for an adapter trained on a 4/8-bit
    base: llama.cpp applies it to the GGUF's weights, which is what the fp32 base holds (for
    the default, exactly: it is the GGUF dequantized). Against an nf4 base the floor alone
    is a mean KL of ~0.5 on the default model, which would hide any export error.
    """
    model, tok = load_base(ModelConfig(name=src.spec, dtype="fp32"), device="cpu")
    prompts = _prompts(tok, data)
    ours_base = torch_logits(model, prompts)
    adapted = load_adapter(model, src.folder, tok).eval()
    ours_adapted = torch_logits(adapted, prompts)
    del adapted, model
    rt_base = llama_cpp_logits(base_gguf, prompts)
    rt_adapted = (llama_cpp_logits(base_gguf, prompts, lora=exported) if lora
                  else llama_cpp_logits(exported, prompts))
    return compare(ours_base, ours_adapted, rt_base, rt_adapted, runtime_name())


def _checked(res: ExportResult, verify: bool) -> bool:
    """Whether to run the file in llama.cpp: asked for and installed (else a note says so)."""
    if not verify:
        return False
    if not have_llama_cpp():
        res.notes.append(f"not verified in llama.cpp: it is not installed here ({INSTALL_HINT})")
        return False
    return True


def _gguf_lora(src: _Adapter, out: Path, base_gguf, verify: bool, max_kl: float,
               data) -> ExportResult:
    res = ExportResult(out)
    with atomic_gguf(out) as tmp:
        write_lora_gguf(src.folder, src.manifest, tmp)
        if _checked(res, verify):
            with _base_gguf(src, base_gguf) as bg:
                res.report = runtime_report(src, bg, tmp, lora=True, data=data)
            gate(res.report, max_kl, str(out))
    res.files.append(out)
    return res


def _gguf_merged(src: _Adapter, out: Path, base_gguf, out_type: str, verify: bool,
                 max_kl: float, data) -> ExportResult:
    if out_type not in OUT_TYPES:
        raise ExportError(f"--outtype {out_type}: choose one of {', '.join(OUT_TYPES)}")
    res = ExportResult(out)
    with atomic_gguf(out) as tmp, _base_gguf(src, base_gguf) as bg:
        if base_gguf is not None or src.spec == DEFAULT_NAME:
            write_merged_from_gguf(src.folder, src.manifest, bg, tmp, out_type)
        else:
            with tempfile.TemporaryDirectory(prefix="adapters-merged-") as folder:
                merged, _ = merge_adapter(src.folder, Path(folder) / "m", base=src.spec,
                                          verify=False)
                write_hf_gguf(merged, tmp, out_type)
        if _checked(res, verify):
            res.report = runtime_report(src, bg, tmp, lora=False, data=data)
            gate(res.report, max_kl, str(out))
    res.files.append(out)
    return res


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _ollama(src: _Adapter, out: Path, base_gguf, verify: bool, max_kl: float, data,
            name: str) -> ExportResult:
    tok = load_tokenizer(resolve_model_path(src.spec))
    try:
        parts = template_parts(tok)
    except ExportError as e:
        parts = None
        note = f"no TEMPLATE written: {e}"
    with atomic_dir(out) as tmp:
        lora = _gguf_lora(src, tmp / "adapter.gguf", base_gguf, verify, max_kl, data)
        with _base_gguf(src, base_gguf) as bg:
            _link_or_copy(bg, tmp / "base.gguf")
        atomic_write_text(tmp / "Modelfile", modelfile("base.gguf", "adapter.gguf", parts,
                                                       stop_tokens(tok, parts)))
    res = ExportResult(out, [out / "Modelfile", out / "base.gguf", out / "adapter.gguf"],
                       lora.report, notes=lora.notes)
    if parts is None:
        res.notes.append(note)
    res.commands = [f"ollama create {name} -f {out / 'Modelfile'}", f"ollama run {name}"]
    return res


def export(adapter: str | Path, to: str, out: str | Path, *, base: str | None = None,
           base_gguf: str | Path | None = None, out_type: str = "f16", verify: bool = True,
           max_kl: float = DEFAULT_MAX_KL, data: list[str] | None = None,
           peft_version: str | None = None, name: str | None = None) -> ExportResult:
    """Write `adapter` as `to` (one of FORMATS) at `out`; see the module docstring."""
    if to not in FORMATS:
        raise ExportError(f"--to {to}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    # refused before any work: a device, a FIFO or someone else's folder is never replaced
    if to in ("gguf-lora", "gguf"):
        check_out_file(out)
    else:
        check_out_folder(out)
    src = _open(adapter, base)
    if to == "peft":
        if not peft_version:
            raise ExportError("--to peft needs --peft-version X.Y (the peft that will load it)")
        path, dropped = export_peft(src.folder, out, peft_version)
        res = ExportResult(path, [path])
        res.notes.append(f"dropped default-valued fields unknown to peft {peft_version}: "
                         f"{', '.join(dropped) or 'none'}")
        return res
    if to == "gguf-lora":
        return _gguf_lora(src, out, base_gguf, verify, max_kl, data)
    if to == "gguf":
        return _gguf_merged(src, out, base_gguf, out_type, verify, max_kl, data)
    return _ollama(src, out, base_gguf, verify, max_kl, data, name or src.folder.name)
