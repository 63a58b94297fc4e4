#!/usr/bin/env python
"""The README's llama.cpp table: exports of test adapters on the default base, run in llama.cpp.

Three adapters (LoRA r=4 on every projection of the embedded SmolLM2-135M, lora_B drawn at
random with std 0.05, seed 1: a stand-in for training that moves the logits): one made on the
fp32 base, one on the 4-bit nf4 base, and the fp32 one again merged into one q8_0 GGUF. Each
is written by `adapters export` and checked in llama.cpp's runtime (scripts/setup installs
it) on the same held-out positions `export` uses; the table is printed as markdown.

  .venv/bin/python scripts/gguf_check.py                 # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapters.adapter import build_manifest, save_adapter
from adapters.config import LoraConfig, ModelConfig
from adapters.lora import attach_lora
from adapters.model import load_base
from adapters.share.export import export
from adapters.share.llama_runtime import have_llama_cpp, runtime_name

CASES = (("trained in fp32", "none", "gguf-lora"), ("trained on the 4-bit base", "4bit",
         "gguf-lora"), ("merged, `--to gguf --outtype q8_0`", "none", "gguf"))


def make_adapter(out: Path, quantization: str, seed: int) -> Path:
    cfg = ModelConfig(name="default", dtype="fp32", quantization=quantization)
    model, tok = load_base(cfg, device="cpu")
    lcfg = LoraConfig(r=4)
    torch.manual_seed(seed)  # lora_A's initialisation too: the same adapter on every run
    pm = attach_lora(model, lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(pm, out, build_manifest(pm.get_base_model(), tok, "default", cfg, lcfg))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not have_llama_cpp():
        print("llama.cpp's runtime is not installed (scripts/setup installs it)", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="adapters-gguf-check-") as tmp:
        for i, (label, quantization, to) in enumerate(CASES):
            t0 = time.time()
            ad = make_adapter(Path(tmp) / f"ad{i}", quantization, args.seed)
            kw = {"out_type": "q8_0"} if to == "gguf" else {}
            rep = export(ad, to, Path(tmp) / f"ad{i}.gguf", **kw).report
            rows.append(f"| {label} | {rep.base.top1:.1%} / {rep.base.mean_kl:.4f} | "
                        f"{rep.adapted.top1:.1%} / {rep.adapted.mean_kl:.4f} | "
                        f"{rep.effect_runtime:.2f} / {rep.effect_ours:.2f} |")
            print(f"{label}: {time.time() - t0:.0f} s", file=sys.stderr)
    print(f"{runtime_name()}, default base (Q4_1 GGUF), {rep.positions} held-out positions, "
          f"random-B r=4 adapters (seed {args.seed}):\n")
    print("| adapter | base alone: top-1 / mean KL | base + adapter: top-1 / mean KL | "
          "KL from the base: llama.cpp / adapters |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
