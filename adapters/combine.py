"""Combine adapters of one base into one adapter (peft's add_weighted_adapter), with a manifest."""

from __future__ import annotations

from pathlib import Path

from .adapter import check_files, save_adapter
from .adapter.archive import resolve_adapter
from .config import ModelConfig
from .errors import AdaptersError
from .model import compare_fingerprints, load_base

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


def _same_base(manifests: list[dict], folders: list[Path]) -> None:
    first = (manifests[0].get("base") or {}).get("fingerprint")
    for m, f in zip(manifests[1:], folders[1:]):
        fp = (m.get("base") or {}).get("fingerprint")
        if not first or not fp:
            raise AdaptersError(f"{f}: no base fingerprint in the manifest; cannot tell "
                                "whether the adapters share a base")
        structural, weights = compare_fingerprints(first, fp)
        if structural or weights:
            raise AdaptersError(f"{f}: trained on another base than {folders[0]} "
                                f"({'; '.join(structural) or 'different weights'})")


def combine(folders: list[str | Path], weights: list[float], out: str | Path,
            method: str = "linear", density: float = 0.5) -> Path:
    """Write a new adapter = weighted combination of `folders` (all for the same base)."""
    from peft import PeftModel

    folders = [resolve_adapter(f) for f in folders]
    if len(folders) < 2:
        raise AdaptersError("combine needs at least two adapters")
    if len(weights) != len(folders):
        raise AdaptersError(f"--weights: {len(weights)} weights for {len(folders)} adapters")
    if method not in METHODS:
        raise AdaptersError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    manifests = [check_files(f) or {} for f in folders]
    _same_base(manifests, folders)
    base_spec = manifests[0]["base"]["name"]
    model, tok = load_base(ModelConfig(name=base_spec, dtype="fp32"), device="cpu")
    names = [f"a{i}" for i in range(len(folders))]
    pm = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0])
    for name, f in zip(names[1:], folders[1:]):
        pm.load_adapter(str(f), adapter_name=name)
    kw = {"density": density} if method.startswith(("ties", "dare")) else {}
    if method == "svd":
        kw["svd_rank"] = max(pm.peft_config[n].r for n in names)
    pm.add_weighted_adapter(names, weights, "combined", combination_type=method, **kw)
    manifest = {k: v for k, v in manifests[0].items()
                if k in ("format", "base", "quantization", "versions")}
    manifest["lora"] = {"r": pm.peft_config["combined"].r,
                        "alpha": pm.peft_config["combined"].lora_alpha}
    manifest["combined_from"] = {"sources": [str(f) for f in folders], "weights": weights,
                                 "method": method, "density": density if kw else None}
    return save_adapter(pm, Path(out), manifest, adapter_name="combined")
