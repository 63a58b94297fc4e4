"""Adapter folders: peft's files plus our manifest, written atomically and checked on load.

A folder holds `adapter_config.json` + `adapter_model.safetensors` (so plain
`peft.PeftModel.from_pretrained(base, folder)` loads it), `manifest.json`: the base spec
and fingerprint, quantization used in training, LoRA settings, package versions, the weights'
sha256 and the creation time (plus data, recipe and training summary when it comes from
`adapters train`), and `README.md`, the model card rendered from the manifest (card.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors import safe_open

from ..errors import AdapterFileError
from ..io import atomic_write_json, fsync_dir, sha256_file
from ..model import base_fingerprint, compare_fingerprints
from .archive import resolve_adapter
from .card import write_card
from .files import (
    CONFIG_FILE,
    FORMAT,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    _numel,
    build_manifest,
    check_files,
    package_versions,
    read_manifest,
)

__all__ = ["CONFIG_FILE", "FORMAT", "MANIFEST_FILE", "WEIGHTS_FILE", "build_manifest",
           "check_base", "check_files", "inspect_adapter", "load_adapter", "package_versions",
           "read_manifest", "save_adapter"]

def save_adapter(model, folder: str | Path, manifest: dict[str, Any],
                 adapter_name: str = "default") -> Path:
    """Write the adapter files into `folder`, each by an atomic rename, the manifest last.

    The manifest carries the sha256 of the weights, so a crash between two renames is caught
    on load as a hash mismatch instead of passing silently.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=folder))
    try:
        model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[adapter_name])
        src = tmp / adapter_name if adapter_name != "default" else tmp
        weights = src / WEIGHTS_FILE
        manifest = {**manifest, "weights": {
            "file": WEIGHTS_FILE, "sha256": sha256_file(weights),
            "bytes": weights.stat().st_size},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            with open(src / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(src / name, folder / name)
        fsync_dir(folder)
        atomic_write_json(folder / MANIFEST_FILE, manifest)
        write_card(folder, manifest)  # derived from the manifest, so written after it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_base(manifest: dict[str, Any] | None, model, tokenizer, folder: str | Path,
               allow_base_mismatch: bool = False) -> list[str]:
    """Compare the manifest's base fingerprint with `model`; return warnings, raise on errors."""
    saved = ((manifest or {}).get("base") or {}).get("fingerprint")
    if not saved or tokenizer is None:
        return ["no base fingerprint to check"] if not saved else []
    structural, weights = compare_fingerprints(saved, base_fingerprint(model, tokenizer))
    if structural:
        raise AdapterFileError(f"{folder}: trained for another base model: " + "; ".join(
            structural))
    if weights:
        msg = (f"{folder}: the base's weights differ from those the adapter was trained on "
               f"({len(weights)} tensors, e.g. {weights[0]}; trained on "
               f"{manifest['base'].get('name')})")
        if not allow_base_mismatch:
            raise AdapterFileError(msg + "; pass allow_base_mismatch to load anyway")
        return [msg]
    return []


def load_adapter(model, folder: str | Path, tokenizer=None, adapter_name: str = "default",
                 allow_base_mismatch: bool = False, is_trainable: bool = False):
    """Attach the adapter in `folder` to `model` (a base or a PeftModel) after checking it.

    Returns the PeftModel. The base fingerprint is checked when a tokenizer is given.
    """
    folder = resolve_adapter(folder)
    manifest = check_files(folder)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    check_base(manifest, base, tokenizer, folder, allow_base_mismatch)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name,
                                         is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterFileError(f"{folder}: does not fit this base model: {e}") from e


def inspect_adapter(folder: str | Path) -> dict[str, Any]:
    """A summary of an adapter folder for `adapters inspect` (never raises on bad files)."""
    info: dict[str, Any] = {"folder": str(folder)}
    try:
        folder = resolve_adapter(folder)
    except AdapterFileError as e:
        return {**info, "integrity": f"FAILED: {e}"}
    try:
        manifest = check_files(folder)
        info["integrity"] = "ok" if manifest else "ok (no manifest: hash not checked)"
    except AdapterFileError as e:
        info["integrity"] = f"FAILED: {e}"
        manifest = None
        try:
            manifest = read_manifest(folder)
        except AdapterFileError:
            pass
    cfg_path = folder / CONFIG_FILE
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        info["peft"] = {k: cfg.get(k) for k in ("peft_type", "r", "lora_alpha", "lora_dropout",
                                                "target_modules", "use_rslora", "use_dora",
                                                "base_model_name_or_path")}
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        info["file_bytes"] = weights.stat().st_size
        if info["integrity"].startswith("ok"):
            with safe_open(weights, "pt") as f:
                info["parameters"] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    if manifest:
        base = manifest.get("base") or {}
        fp = base.get("fingerprint") or {}
        info["base"] = base.get("name")
        info["fingerprint"] = {k: fp.get(k) for k in ("model_type", "architectures", "config")}
        info["fingerprint"]["tokenizer"] = fp.get("tokenizer")
        info["fingerprint"]["probed_tensors"] = len(fp.get("probe", {}))
        info["quantization"] = manifest.get("quantization")
        info["versions"] = manifest.get("versions")
        info["created"] = manifest.get("created")
        if "training" in manifest:
            info["training"] = manifest["training"]
    return info


