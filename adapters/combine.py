"""Combine adapters of one base into one adapter (peft's add_weighted_adapter), with a manifest."""

from __future__ import annotations

from pathlib import Path

from .adapter import Manifest, check_files, load_adapter, new_manifest, save_adapter
from .adapter.archive import resolve_adapter
from .config import ModelConfig
from .errors import AdaptersError
from .io import check_out_folder
from .model import compare_fingerprints, load_base

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


def _manifests(folders: list[Path]) -> list[Manifest]:
    """Each folder's checked manifest; all must name the same base (by fingerprint)."""
    manifests = []
    for f in folders:
        m = check_files(f)
        if m is None or m.base.fingerprint is None:
            raise AdaptersError(f"{f}: no base fingerprint in the manifest; cannot tell "
                                "whether the adapters share a base (`adapters convert --base "
                                "BASE` adds one)")
        manifests.append(m)
    first = manifests[0].base.fingerprint.to_dict()
    for m, f in zip(manifests[1:], folders[1:]):
        structural, weights = compare_fingerprints(first, m.base.fingerprint.to_dict())
        if structural or weights:
            raise AdaptersError(f"{f}: trained on another base than {folders[0]} "
                                f"({'; '.join(structural) or 'different weights'})")
    return manifests


def combine(folders: list[str | Path], weights: list[float], out: str | Path,
            method: str = "linear", density: float = 0.5) -> Path:
    """Write a new adapter = weighted combination of `folders` (all for the same base)."""
    check_out_folder(out, replace=False)
    folders = [resolve_adapter(f) for f in folders]
    if len(folders) < 2:
        raise AdaptersError("combine needs at least two adapters")
    if len(weights) != len(folders):
        raise AdaptersError(f"--weights: {len(weights)} weights for {len(folders)} adapters")
    if method not in METHODS:
        raise AdaptersError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    first = _manifests(folders)[0]
    model, _ = load_base(ModelConfig(name=first.base.name, dtype="fp32"), device="cpu")
    names = [f"a{i}" for i in range(len(folders))]
    pm = load_adapter(model, folders[0], adapter_name=names[0])
    for name, f in zip(names[1:], folders[1:]):
        load_adapter(pm, f, adapter_name=name)
    kw = {"density": density} if method.startswith(("ties", "dare")) else {}
    if method == "svd":
        kw["svd_rank"] = max(pm.peft_config[n].r for n in names)
    pm.add_weighted_adapter(names, weights, "combined", combination_type=method, **kw)
    cfg = pm.peft_config["combined"]
    manifest = new_manifest(
        first.base.name, first.base.fingerprint, quantization=first.quantization,
        lora={"r": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
              "targets": cfg.target_modules, "use_rslora": cfg.use_rslora,
              "use_dora": cfg.use_dora},
        combined_from={"sources": [str(f) for f in folders], "weights": weights,
                       "method": method, "density": density if kw else None})
    return save_adapter(pm, Path(out), manifest, adapter_name="combined")
