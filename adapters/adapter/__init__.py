"""Adapter folders: peft's files plus our manifest, written atomically and checked on load.

A folder holds `adapter_config.json` + `adapter_model.safetensors` (so plain
`peft.PeftModel.from_pretrained(base, folder)` loads it), `manifest.json`: the base spec
and fingerprint, quantization used in training, LoRA settings, package versions, the weights'
sha256 and the creation time (plus data, recipe and training summary when it comes from
`adapters train`), and `README.md`, the model card rendered from the manifest (card.py).
The format itself (file names, the typed Manifest, the completeness check) is files.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peft import PeftModel, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import AdapterFileError
from ..io import atomic_write_text, check_out_folder, fsync_dir
from ..model import base_fingerprint, compare_fingerprints
from .archive import resolve_adapter
from .card import render
from .files import (
    CARD_FILE,
    CONFIG_FILE,
    FORMAT,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    check_files,
    check_fits_base,
    new_manifest,
    numel,
    package_versions,
    read_manifest,
)
from .peftconfig import for_peft, read_config

__all__ = ["CARD_FILE", "CONFIG_FILE", "FORMAT", "MANIFEST_FILE", "WEIGHTS_FILE", "Manifest",
           "build_manifest", "check_base", "check_files", "check_fits_base", "inspect_adapter",
           "load_adapter", "new_manifest", "open_with_base", "package_versions", "read_base_name",
           "read_manifest", "save_adapter", "start_from", "write_card", "write_manifest"]


def build_manifest(model, tokenizer, base_spec: str, model_cfg=None, lora_cfg=None,
                   extra: dict[str, Any] | None = None) -> Manifest:
    """The manifest of an adapter trained on `model` (its base fingerprint taken now).

    `model_cfg` / `lora_cfg` are the recipe's ModelConfig / LoraConfig; `extra` holds the
    optional sections (data, recipe, training). save_adapter adds the weights' hash.
    """
    return new_manifest(base_spec, base_fingerprint(model, tokenizer), quantization=model_cfg,
                        lora=lora_cfg, **(extra or {}))


def write_card(folder: str | Path, manifest: Manifest, name: str | None = None) -> Path:
    """README.md in `folder`; `name` (default: the folder's) is what the card calls it."""
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, render(manifest, name or Path(folder).resolve().name))
    return path


def write_manifest(folder: str | Path, manifest: Manifest, name: str | None = None) -> None:
    """manifest.json, then the card derived from it, each replaced atomically."""
    manifest.write(folder)
    write_card(folder, manifest, name)


def save_adapter(model, folder: str | Path, manifest: Manifest | dict[str, Any],
                 adapter_name: str = "default", name: str | None = None) -> Path:
    """Write the adapter files into `folder`, each by an atomic rename, the manifest last.

    The manifest carries the sha256 of the weights, so a crash between two renames is caught
    on load as a hash mismatch instead of passing silently.
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict(manifest, "the manifest passed to save_adapter")
    folder = Path(folder)
    check_out_folder(folder, replace=False)  # its files are replaced one by one, not it
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=folder))
    try:
        model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[adapter_name])
        src = tmp / adapter_name if adapter_name != "default" else tmp
        manifest = manifest.with_weights(src / WEIGHTS_FILE)
        for file in (WEIGHTS_FILE, CONFIG_FILE):
            with open(src / file, "rb") as f:
                os.fsync(f.fileno())
            os.replace(src / file, folder / file)
        fsync_dir(folder)
        write_manifest(folder, manifest, name)  # name: what the card calls it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_base(manifest: Manifest | None, model, tokenizer, folder: str | Path,
               allow_base_mismatch: bool = False) -> list[str]:
    """Compare the manifest's base fingerprint with `model`; return warnings, raise on errors."""
    saved = manifest.base.fingerprint if manifest else None
    if saved is None or tokenizer is None:
        return ["no base fingerprint to check"] if saved is None else []
    structural, weights = compare_fingerprints(saved.to_dict(),
                                               base_fingerprint(model, tokenizer))
    if structural:
        raise AdapterFileError(f"{folder}: trained for another base model: " + "; ".join(
            structural))
    if weights:
        msg = (f"{folder}: the base's weights differ from those the adapter was trained on "
               f"({len(weights)} tensors, e.g. {weights[0]}; trained on {manifest.base.name})")
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
    check_fits_base(folder, base)
    config = for_peft(folder, base)  # None unless a pattern had to be resolved into names
    added = False
    try:
        if isinstance(model, PeftModel):
            if config is not None and adapter_name not in model.peft_config:
                config.inference_mode = not is_trainable
                model.add_adapter(adapter_name, config)  # peft then skips reading the file
                added = True
            model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name,
                                         is_trainable=is_trainable, config=config)
    except (RuntimeError, ValueError, KeyError) as e:
        if added:
            model.delete_adapter(adapter_name)
        raise AdapterFileError(f"{folder}: does not fit this base model: {str(e)[:300]}") from e


def start_from(model, folder: str | Path, tokenizer, r: int, alpha: float,
               adapter_name: str = "default") -> None:
    """Copy a trained adapter's weights into the fresh LoRA of `model` (lora.init_from), after
    the checks of every load; its rank, alpha and targets must be the recipe's."""
    folder = resolve_adapter(folder)
    manifest = check_files(folder)
    base = model.get_base_model()
    check_base(manifest, base, tokenizer, folder)
    check_fits_base(folder, base)
    cfg = read_config(folder)
    wrong = [f"{key} is {cfg.get(key)} there, {want} in the recipe (lora.{name})"
             for key, name, want in (("r", "r", r), ("lora_alpha", "alpha", alpha))
             if cfg.get(key) != want]
    if wrong:
        raise AdapterFileError(f"lora.init_from: {folder}: " + "; ".join(wrong))
    weights = load_file(folder / WEIGHTS_FILE)
    result = set_peft_model_state_dict(model, weights, adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise AdapterFileError(
            f"lora.init_from: {folder}: its tensors do not match the recipe's lora.targets "
            f"({len(missing)} LoRA tensors missing, e.g. {missing[:1]}; "
            f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:1]})")


def open_with_base(adapter: str | Path, base: str | None) -> tuple[Path, Manifest | None, str]:
    """(folder, manifest, base spec) of an adapter folder or archive, its files checked: the
    base is `base`, else the one its manifest names (an error naming --base when neither)."""
    folder = resolve_adapter(adapter)
    manifest = check_files(folder)
    spec = base or (manifest.base.name if manifest else None)
    if not spec:
        raise AdapterFileError(f"{adapter}: no manifest names the base; pass --base")
    return folder, manifest, spec


def read_base_name(adapter: str | Path) -> str | None:
    """The base spec an adapter folder or archive names in its manifest (None without one)."""
    manifest = read_manifest(resolve_adapter(adapter))
    return manifest.base.name if manifest else None


def inspect_adapter(folder: str | Path) -> dict[str, Any]:
    """A summary of an adapter folder for `adapters inspect` (never raises on bad files)."""
    info: dict[str, Any] = {"folder": str(folder)}
    try:
        folder = resolve_adapter(folder)
    except AdapterFileError as e:
        return {**info, "integrity": f"FAILED: {e}"}
    manifest = None
    try:
        manifest = check_files(folder)
        info["integrity"] = "ok" if manifest else "ok (no manifest: hash not checked)"
    except AdapterFileError as e:
        info["integrity"] = f"FAILED: {e}"
        try:
            manifest = read_manifest(folder)
        except AdapterFileError:
            pass
    try:
        cfg = read_config(folder)
        info["peft"] = {k: cfg.get(k) for k in ("peft_type", "r", "lora_alpha", "lora_dropout",
                                                "target_modules", "use_rslora", "use_dora",
                                                "base_model_name_or_path")}
    except AdapterFileError as e:
        info["peft"] = f"FAILED: {e}"
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        info["file_bytes"] = weights.stat().st_size
        if info["integrity"].startswith("ok"):
            with safe_open(weights, "pt") as f:
                info["parameters"] = sum(numel(f.get_slice(k).get_shape()) for k in f.keys())
    if manifest:
        info.update(_manifest_summary(manifest))
    return info


def _manifest_summary(manifest: Manifest) -> dict[str, Any]:
    fp = manifest.base.fingerprint
    out: dict[str, Any] = {"base": manifest.base.name}
    if fp:
        out["fingerprint"] = {"model_type": fp.model_type, "architectures": fp.architectures,
                              "config": fp.config,
                              "tokenizer": fp.tokenizer.to_dict() if fp.tokenizer else None,
                              "probed_tensors": len(fp.probe)}
    full = manifest.to_dict()
    out.update({k: full.get(k) for k in ("quantization", "versions", "created")})
    if manifest.training is not None:
        out["training"] = manifest.training
    if manifest.parity is not None:  # adapters verify --parity
        out["parity"] = {"date": manifest.parity.date, "passed": manifest.parity.passed,
                         "runtimes": {r.runtime: {"top1": r.top1, "kl": r.kl,
                                                  "greedy": r.greedy, "passed": r.passed}
                                      for r in manifest.parity.rows},
                         "skipped": manifest.parity.skipped}
    return out
