"""GGUF files, the format llama.cpp and Ollama load: names, row order, metadata, atomic writes.

Tensor names come from the `gguf` package's HF -> GGUF map (the one llama.cpp's converter
uses), never from a table of our own. Two facts of that converter matter to anything we
write: Llama-family q/k projections are stored with their rows permuted (llama.cpp applies
RoPE to interleaved pairs, HF to halves), and GPT-2's Conv1D weights are stored transposed
to (out, in) like every other GGUF matrix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from ..errors import AdaptersError
from ..io import check_out_file, fsync_dir

# model_type (HF config) -> llama.cpp architecture. Only those whose conversion we write and
# test; anything else is refused with what to run instead.
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
         "gpt2": gguf.MODEL_ARCH.GPT2}
_PERMUTED = ("attn_q", "attn_k")  # llama arch only: rows permuted for llama.cpp's RoPE
OUT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# HF buffers that are not weights (GPT-2's causal mask in old checkpoints, rotary caches).
_NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class ExportError(AdaptersError):
    """An adapter or model cannot be written for (or does not run right in) another runtime."""


def arch_of(model_type: str, what: str) -> str:
    """The llama.cpp architecture name for an HF model_type, or ExportError saying why not."""
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ExportError(
            f"{what}: model_type {model_type!r} has no GGUF export here (supported: "
            f"{', '.join(sorted(ARCHS))}); merge with `adapters merge` and convert the folder "
            "with llama.cpp's convert_hf_to_gguf.py")
    return gguf.MODEL_ARCH_NAMES[arch]


def name_map(model_type: str, n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(ARCHS[model_type], n_layers)


def gguf_name(tmap: gguf.TensorNameMap, hf_name: str) -> str | None:
    """'model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight' (None: unmapped)."""
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split RoPE row order -> llama.cpp's interleaved order, on dim 0 of `w`.

    Within each head the rows [x0..x_{d/2-1}, y0..y_{d/2-1}] become [x0, y0, x1, y1, ...].
    """
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def to_gguf_layout(model_type: str, name: str, w: np.ndarray, config) -> np.ndarray:
    """Put an HF (out, ...) row block into GGUF row order (q/k permutation on Llama)."""
    if ARCHS[model_type] != gguf.MODEL_ARCH.LLAMA:
        return w
    kind = name.split(".")[-2] if name.count(".") >= 2 else ""
    if kind == "attn_q":
        return permute_rows(w, config.num_attention_heads)
    if kind == "attn_k":
        return permute_rows(w, config.num_key_value_heads or config.num_attention_heads)
    return w


def encode(w: np.ndarray, out_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A float matrix in `out_type` (vectors and rows q8_0 cannot block stay f32 / f16)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 2:
        return w, gguf.GGMLQuantizationType.F32
    qtype = OUT_TYPES[out_type]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and w.shape[-1] % 32:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(w, qtype), qtype


def add_tensor(writer: gguf.GGUFWriter, name: str, w: np.ndarray, out_type: str) -> None:
    data, qtype = encode(w, out_type)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=qtype)


def file_type(out_type: str) -> int:
    return int(_FILE_TYPE[out_type])


@contextlib.contextmanager
def atomic_gguf(out: str | Path) -> Iterator[Path]:
    """A temporary path beside `out`, renamed onto it when the block succeeds."""
    out = Path(out)
    check_out_file(out)  # a device or a folder at `out` is refused, never replaced
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # a file to share: mkstemp's 0600 would hide it from others
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        check_out_file(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter,
                  skip: tuple[str, ...] = ()) -> None:
    """Every key of `reader` but the file-level ones (and `skip`) into `writer`."""
    own = ("GGUF.", gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, *skip)
    for key, field in reader.fields.items():
        if key.startswith(own):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def read_string(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (rows = ne[1], columns = ne[0])."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def is_weight(hf_name: str) -> bool:
    return not hf_name.endswith(_NOT_WEIGHTS)
