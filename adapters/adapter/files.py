"""The adapter folder format: file names, the manifest, and the completeness check.

The leaf of the adapter package: archive.py, card.py and the save/load functions build on it.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..errors import AdapterFileError
from ..io import sha256_file
from ..model import base_fingerprint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "adapterkit/1"


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("adapterkit", "torch", "transformers", "peft", "bitsandbytes", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_manifest(model, tokenizer, base_spec: str, model_cfg=None, lora_cfg=None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything but the weights' hash, which save_adapter adds once the file exists."""
    return {
        "format": FORMAT,
        "base": {"name": base_spec, "fingerprint": base_fingerprint(model, tokenizer)},
        "quantization": dataclasses.asdict(model_cfg) if model_cfg is not None else None,
        "lora": dataclasses.asdict(lora_cfg) if lora_cfg is not None else None,
        "versions": package_versions(),
        **(extra or {}),
    }


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from e


def check_files(folder: str | Path) -> dict[str, Any] | None:
    """Check that an adapter folder is complete and intact; return its manifest (or None).

    Raises AdapterFileError naming the file: missing config, pickle-only weights, a weights
    file whose hash differs from the manifest, or one that safetensors cannot parse.
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
    manifest = read_manifest(folder)
    expected = (manifest or {}).get("weights", {}).get("sha256")
    if expected and sha256_file(weights) != expected:
        raise AdapterFileError(
            f"{weights}: corrupted or truncated (sha256 differs from {MANIFEST_FILE}; "
            f"{weights.stat().st_size} bytes on disk, {manifest['weights'].get('bytes')} written)")
    try:
        with safe_open(weights, "pt") as f:
            list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise AdapterFileError(f"{weights}: not a readable safetensors file ({e})") from e
    return manifest


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
