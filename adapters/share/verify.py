"""Receive adapters safely: `verify` checks a folder or archive, `convert` rescues pickles.

verify answers "is this intact, and does it fit my base?" without trusting anything in the
folder: the weights' sha256 against the manifest, every tensor finite, every LoRA matrix the
shape its config says, nothing but safetensors, and with a base the fingerprint, a real load
and one forward pass. `convert` turns a peft `adapter_model.bin` into safetensors, reading the
pickle with `torch.load(weights_only=True)` only, so no code in it can run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapter import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    check_base,
    load_adapter,
    new_manifest,
    read_manifest,
    write_manifest,
)
from ..adapter.archive import resolve_adapter
from ..adapter.files import MAX_ABS_WEIGHT, read_header, value_problems
from ..adapter.peftconfig import read_config, shape_problems, tensor_problems
from ..config import ModelConfig
from ..errors import AdapterFileError
from ..io import atomic_dir, sha256_file
from ..model import base_fingerprint, load_base

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def verify(path: str | Path, base: str | None = None, quantization: str = "none",
           device: str | None = None) -> list[Check]:
    """Every check on an adapter folder or archive; the adapter is good when all are ok."""
    try:
        folder = resolve_adapter(path)
    except AdapterFileError as e:
        return [Check("archive", False, str(e))]
    if not folder.is_dir():
        return [Check("folder", False, f"{folder}: not found")]
    checks = [_no_pickles(folder)]
    config = _config(folder, checks)
    manifest = _manifest_hash(folder, checks)
    if (folder / WEIGHTS_FILE).is_file() and checks[-1].ok:
        checks += _tensors(folder / WEIGHTS_FILE, config)
    if base is not None and all(c.ok for c in checks):
        checks += _against_base(folder, manifest, base, quantization, device)
    return checks


def _no_pickles(folder: Path) -> Check:
    found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if found:
        return Check("safetensors only", False,
                     f"pickle file(s) {', '.join(found)} present: refused, loading a pickle can "
                     "run code (`adapters convert` makes a safetensors copy)")
    return Check("safetensors only", True, "no pickle files")


def _config(folder: Path, checks: list[Check]) -> dict | None:
    """peft's config, checked field by field (types, ranges, patterns) as every load does."""
    try:
        config = read_config(folder)
    except AdapterFileError as e:
        checks.append(Check("config", False, str(e)))
        return None
    checks.append(Check("config", True, f"{CONFIG_FILE}: {config.get('peft_type')} r="
                        f"{config.get('r')}"))
    return config


def _manifest_hash(folder: Path, checks: list[Check]) -> Manifest | None:
    """The manifest check (present, valid, every field of the right type), then the weights'
    sha256 against it."""
    weights = folder / WEIGHTS_FILE
    try:
        manifest = read_manifest(folder)
    except AdapterFileError as e:
        checks.append(Check("manifest", False, str(e)))
        return None
    if manifest is None:
        checks.append(Check("sha256", False, f"{folder / MANIFEST_FILE}: missing, so the "
                            "weights cannot be checked (`adapters convert` adds one)"))
        return None
    checks.append(Check("manifest", True, f"{MANIFEST_FILE}: {manifest.format}, base "
                        f"{manifest.base.name}"))
    if not weights.is_file():
        checks.append(Check("sha256", False, f"{weights}: missing"))
    elif manifest.weights is None:
        checks.append(Check("sha256", False, f"{folder / MANIFEST_FILE}: states no sha256 of "
                            "the weights, so they cannot be checked (`adapters convert` "
                            "remakes it)"))
    else:
        expected, actual = manifest.weights.sha256, sha256_file(weights)
        ok = actual == expected
        checks.append(Check("sha256", ok, f"{WEIGHTS_FILE}: " + (
            f"sha256 {actual[:16]}... as in the manifest" if ok else
            f"sha256 {actual[:16]}... but the manifest says {expected[:16]}... "
            "(corrupted, truncated or altered)")))
    return manifest


def _summary(problems: list[str]) -> str:
    return "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3
                                      else "")


def _tensors(weights: Path, config: dict | None) -> list[Check]:
    """dtypes (floating only) and shapes from the header, then each tensor finite."""
    try:
        header = read_header(weights)
    except AdapterFileError as e:
        return [Check("readable", False, str(e))]
    not_float = tensor_problems(header, None)
    checks = [Check("dtypes", not not_float, f"{len(header)} tensors, all floating point"
                    if not not_float else _summary(not_float))]
    if config is not None:
        try:
            problems = shape_problems({k: s for k, (_, s) in header.items()}, config,
                                      str(weights.parent / CONFIG_FILE))
        except AdapterFileError as e:  # a target pattern that cannot be matched in time
            problems = [str(e)]
        checks.append(Check("shapes", not problems, "every LoRA matrix fits the config" if not
                            problems else _summary(problems)))
    if not_float:
        return checks
    bad = value_problems(weights)
    return [Check("finite", not bad, f"{len(header)} tensors all finite, within "
                  f"+-{MAX_ABS_WEIGHT:g}" if not bad else _summary(bad))] + checks


def _against_base(folder: Path, manifest: Manifest | None, base: str, quantization: str,
                  device: str | None) -> list[Check]:
    model, tok = load_base(ModelConfig(name=base, quantization=quantization), device)
    try:
        warnings = check_base(manifest, model, tok, folder)
        checks = [Check("base fingerprint", True, "; ".join(warnings) if warnings else
                        f"fits {base}")]
    except AdapterFileError as e:
        return [Check("base fingerprint", False, str(e))]
    try:
        peft_model = load_adapter(model, folder, tokenizer=tok).eval()
        ids = tok("def hello():", return_tensors="pt")["input_ids"].to(peft_model.device)
        with torch.no_grad():
            logits = peft_model(ids).logits
    except AdapterFileError as e:
        return checks + [Check("load + forward", False, str(e))]
    ok = bool(logits.isfinite().all())
    return checks + [Check("load + forward", ok, f"loads into {base}; one forward pass gives "
                           + ("finite logits" if ok else "NaN or inf logits"))]


def convert(old: str | Path, out: str | Path | None = None, base: str | None = None) -> Path:
    """A safetensors copy of a peft adapter folder saved as adapter_model.bin (or one without
    a manifest), with a manifest and card; the old folder is left as it is."""
    old = Path(old)
    out = Path(out) if out else old.with_name(old.name + "-safetensors")
    if not (old / CONFIG_FILE).is_file():
        raise AdapterFileError(f"{old / CONFIG_FILE}: missing; not a peft adapter folder")
    config = read_config(old)
    source, state = _read_weights(old)
    not_float = [k for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise AdapterFileError(f"{source}: tensor {not_float[0]} is {state[not_float[0]].dtype}"
                               f" ({len(not_float)} such); LoRA weights are floating point")
    manifest = _converted_manifest(config, source, base)
    with atomic_dir(out) as tmp:
        # clone: tensors that shared storage in the pickle must be separate for safetensors
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()},
                  tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        shutil.copy(old / CONFIG_FILE, tmp / CONFIG_FILE)
        write_manifest(tmp, manifest.with_weights(tmp / WEIGHTS_FILE), name=out.name)
    return out


def _read_weights(old: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file read, its tensors): adapter_model.bin read as weights only, else the
    safetensors file."""
    source = old / "adapter_model.bin"
    if source.is_file():
        try:  # weights_only: tensors and plain containers only, never code
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError: what torch raises varies
            raise AdapterFileError(f"{source}: refused: it holds more than tensors, and only "
                                   f"weights are ever loaded ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0]})") from e
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise AdapterFileError(f"{source}: expected a dict of named tensors")
        return source, state
    if (old / WEIGHTS_FILE).is_file():
        return old / WEIGHTS_FILE, load_file(old / WEIGHTS_FILE)
    raise AdapterFileError(f"{old}: neither adapter_model.bin nor {WEIGHTS_FILE} found")


def _converted_manifest(config: dict, source: Path, base: str | None) -> Manifest:
    """The manifest of a converted adapter: LoRA settings from peft's config, the base's
    fingerprint when `base` is given (loaded once for it)."""
    fingerprint = None
    if base:
        model, tok = load_base(ModelConfig(name=base), "cpu")
        fingerprint = base_fingerprint(model, tok)
    lora = {"r": config.get("r"), "alpha": config.get("lora_alpha"),
            "dropout": config.get("lora_dropout"), "targets": config.get("target_modules"),
            "use_rslora": config.get("use_rslora"), "use_dora": config.get("use_dora")}
    return new_manifest(base or config.get("base_model_name_or_path"), fingerprint, lora=lora,
                        converted_from={"file": source.name, "sha256": sha256_file(source)})
