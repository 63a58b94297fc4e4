"""The adapter folder format: file names, the typed manifest, and the completeness check.

The leaf of the adapter package (archive.py, card.py and the save/load functions build on it).
A folder holds peft's `adapter_config.json` + `adapter_model.safetensors`, our
`manifest.json` and the model card `README.md`. The manifest is read and written only here,
through `Manifest`: reading validates every known field's type and names the file and the
field at fault; keys this version does not know are kept and written back, so a manifest
from a newer adapterkit survives a round trip.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..errors import AdapterFileError
from ..io import atomic_write_json, sha256_file
from .peftconfig import CONFIG_FILE, base_problems, lora_modules, read_config, tensor_problems
from .schema import kind, parse, read_json, to_json
from .sections import (
    BaseInfo,
    CombinedFrom,
    ConvertedFrom,
    DataInfo,
    EvalResult,
    LoraInfo,
    ParityInfo,
    QuantInfo,
    Section,
    TaskInfo,
    WeightsInfo,
)

WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
FORMAT = "adapterkit/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_ABS_WEIGHT = 1e4  # far above trained LoRA weights (|x| < 10), far below fp16's 65504
MAX_WEIGHTS_BYTES = 1 << 40  # a manifest stating more describes no LoRA adapter


_OPTIONAL = ("weights", "created", "data", "recipe", "training", "eval", "combined_from",
             "converted_from", "task", "parity")  # written only when set


@dataclass(kw_only=True)
class Manifest(Section):
    """manifest.json. `weights` and `created` are None until the weights file is written."""
    format: str = FORMAT
    base: BaseInfo
    quantization: QuantInfo | None = None
    lora: LoraInfo | None = None
    versions: dict[str, str] = field(default_factory=dict)
    data: DataInfo | None = None
    recipe: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    eval: list[EvalResult] | None = None
    combined_from: CombinedFrom | None = None
    converted_from: ConvertedFrom | None = None
    weights: WeightsInfo | None = None
    created: str | None = None
    task: TaskInfo | None = None  # a classification / regression head (None: a causal LM)
    parity: ParityInfo | None = None  # `adapters verify --parity`
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """Whether the adapter was trained on a 4/8-bit base."""
        return self.quantization is not None and self.quantization.quantization != "none"

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = MANIFEST_FILE) -> Manifest:
        """Check `data` (parsed JSON) field by field; AdapterFileError names `source` and the
        field. Unknown keys are kept in `extra` of their section."""
        if not isinstance(data, dict):
            raise AdapterFileError(f"{source}: must be a JSON object (the adapter's manifest), "
                                   f"got {kind(data)}; rewrite it or delete it and run "
                                   "`adapters convert`")
        fix = f"fix {MANIFEST_FILE} or remake it with `adapters convert`"
        manifest = parse(cls, data, str(source), fix)
        w = manifest.weights
        if w is not None and (not 0 <= w.bytes <= MAX_WEIGHTS_BYTES
                              or not _SHA256.fullmatch(w.sha256)):
            raise AdapterFileError(f"{source}: field 'weights' must hold a size in 0..2**40 "
                                   f"and a "
                                   f"64-digit hex sha256, got {w.bytes} and "
                                   f"{w.sha256[:70]!r}; {fix}")
        return manifest

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of an adapter folder; AdapterFileError when missing or invalid."""
        path = Path(folder) / MANIFEST_FILE
        return cls.from_dict(read_json(path, "`adapters convert` adds one"), path)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the same keys as ever (the optional ones when set), plus any unknown
        ones read in."""
        out = to_json(self)
        return {k: v for k, v in out.items() if v is not None or k not in _OPTIONAL}

    def write(self, folder: str | Path) -> Path:
        """manifest.json in `folder`, replaced atomically."""
        path = Path(folder) / MANIFEST_FILE
        atomic_write_json(path, self.to_dict())
        return path

    def with_weights(self, weights: str | Path) -> Manifest:
        """A copy stamped with the weights file's name, sha256 and size, and the time now."""
        weights = Path(weights)
        return dataclasses.replace(
            self, weights=WeightsInfo(WEIGHTS_FILE, sha256_file(weights), weights.stat().st_size),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def package_versions() -> dict[str, str]:
    """Installed versions of adapterkit and the libraries an adapter's numbers depend on."""
    out = {}
    for name in ("adapterkit", "torch", "transformers", "peft", "bitsandbytes", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def new_manifest(base_name: str | None, fingerprint: Any = None, *, quantization: Any = None,
                 lora: Any = None, **sections: Any) -> Manifest:
    """The one builder of manifests: format and package versions stamped, every section
    checked as on reading. Sections may be dataclasses (ModelConfig, LoraConfig, ...) or
    plain dicts; `sections` are the optional ones (data, recipe, training, combined_from,
    converted_from, ...). The weights are added by `Manifest.with_weights` once written."""
    raw = {"format": FORMAT, "base": {"name": base_name, "fingerprint": to_json(fingerprint)},
           "quantization": to_json(quantization), "lora": to_json(lora),
           "versions": package_versions(), **{k: to_json(v) for k, v in sections.items()}}
    return Manifest.from_dict(raw, "the manifest being built")


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's manifest, or None when it has none; AdapterFileError when invalid."""
    if not (Path(folder) / MANIFEST_FILE).is_file():
        return None
    return Manifest.read(folder)


def check_files(folder: str | Path) -> Manifest | None:
    """Check that an adapter folder is complete and intact; return its manifest (or None).

    Raises AdapterFileError naming the file: missing config, pickle-only weights, an invalid
    manifest, a weights file whose hash differs from the manifest, or one that safetensors
    cannot parse.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFileError(f"{folder}: adapter folder not found")
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterFileError(f"{folder / CONFIG_FILE}: missing; this is not a peft adapter "
                               "folder (expected adapter_config.json + adapter_model.safetensors)")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        hint = (" It has adapter_model.bin (a pickle): convert it with `adapters convert`."
                if (folder / "adapter_model.bin").exists() else "")
        raise AdapterFileError(f"{weights}: missing.{hint}")
    config = read_config(folder)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.weights is not None and (
            sha256_file(weights) != manifest.weights.sha256):
        raise AdapterFileError(
            f"{weights}: corrupted or truncated (sha256 differs from {MANIFEST_FILE}; "
            f"{weights.stat().st_size} bytes on disk, {manifest.weights.bytes} written)")
    problems = tensor_problems(read_header(weights), config, str(folder / CONFIG_FILE))
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterFileError(f"{weights}: {problems[0]}{more}; the file does not match "
                               f"{CONFIG_FILE} (`adapters verify` lists every problem)")
    problems = value_problems(weights)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterFileError(f"{weights}: {problems[0]}{more}; refused (a diverged or "
                               "damaged adapter: every answer with it would fail)")
    return manifest


def _duplicate_keys(weights: str | Path) -> list[str]:
    """Names the safetensors header (a JSON object) holds twice: the parser keeps one of
    them silently, so two tools could read different tensors from the same file."""
    dup: list[str] = []

    def pairs(items):  # each JSON object's (key, value) pairs, duplicates included
        keys = [k for k, _ in items]
        dup.extend(k for k in dict.fromkeys(keys) if keys.count(k) > 1)
        return dict(items)

    try:
        with open(weights, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > MAX_HEADER_BYTES:
                return []  # safe_open refuses it with its own message
            json.loads(f.read(size), object_pairs_hook=pairs)
    except (OSError, ValueError):
        return []  # not parseable: safe_open says why
    return dup


def check_fits_base(folder: str | Path, model) -> None:
    """AdapterFileError when the adapter's config contradicts `model` (layers it lacks,
    fan_in_fan_out on layers that are not Conv1D); after check_files."""
    folder = Path(folder)
    modules = lora_modules(read_header(folder / WEIGHTS_FILE))
    problems = base_problems(read_config(folder), modules, model)
    if problems:
        raise AdapterFileError(f"{folder / CONFIG_FILE}: {problems[0]}; it does not fit this "
                               "base model")


def read_header(weights: str | Path) -> dict[str, tuple[str, tuple]]:
    """{tensor name: (safetensors dtype, shape)} from the file's header, no tensor read."""
    dup = _duplicate_keys(weights)
    if dup:
        raise AdapterFileError(f"{weights}: the header names tensor {dup[0][:80]!r} twice; "
                               "refused (which one a reader gets is undefined)")
    try:
        with safe_open(weights, "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                    for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise AdapterFileError(f"{weights}: not a readable safetensors file ({e})") from e


def value_problems(weights: str | Path) -> list[str]:
    """Tensors that hold NaN or inf, or values far beyond any trained LoRA's (|x| above
    MAX_ABS_WEIGHT): each would make every request on the adapter fail or overflow."""
    problems = []
    with safe_open(weights, "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if not t.is_floating_point():
                continue  # dtypes are tensor_problems' check
            if not bool(t.isfinite().all()):
                problems.append(f"{k}: holds NaN or inf")
            elif t.numel() and float(t.abs().max()) > MAX_ABS_WEIGHT:
                problems.append(f"{k}: holds {float(t.abs().max()):.3g}, beyond the "
                                f"{MAX_ABS_WEIGHT:g} any trained LoRA weight stays within")
    return problems


def numel(shape) -> int:
    """Element count of a tensor shape (safetensors gives shapes without tensors)."""
    n = 1
    for s in shape:
        n *= s
    return n
