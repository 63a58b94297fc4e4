#!/usr/bin/env python
"""Benchmark: many adapters on one base — load, switch, and mixed-batch generation.

Eight adapters (r=16 on every projection, random non-zero B so each changes the output) on
the embedded default (SmolLM2-135M, or --base). Measured in one process, same prompts:
  load      Registry.load from disk (fingerprint check + safetensors + peft inject), mean
  switch    peft's set_adapter between two loaded adapters, mean
  mixed     8 prompts, 8 distinct adapters, one batch (one forward per token for all rows)
  single    the same 8 prompts, all on one adapter, one batch
  serial    the 8 prompts one after another, each alone with its own adapter
  base      the 8 prompts on the plain base (no LoRA at all)
  mixed-peft  `mixed` through peft's own mixed-batch path (adapter_names) instead of ours
Throughput = generated tokens / wall seconds (EOS ignored, so every row makes --new tokens).
Target: mixed >= 0.7x single.

  .venv/bin/python scripts/bench_swap.py              # ~2 min on 2 CPU cores
  .venv/bin/python scripts/bench_swap.py --device cuda --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPTS = ["What does os.path.join do?", "Explain list comprehensions.", "What is a dict?",
           "How do I read a file?", "What does json.dumps return?", "Name a sorting function.",
           "What is a generator?", "How do I start a thread?"]


def make_adapters(reg, work: Path, n: int, r: int) -> list[Path]:
    import torch

    from adapters.adapter import build_manifest, save_adapter
    from adapters.config import LoraConfig, ModelConfig
    from adapters.lora import attach_lora

    folders = []
    lcfg = LoraConfig(r=r, alpha=2 * r)
    for i in range(n):
        folder = work / f"adapter-{i}"
        folders.append(folder)
        if (folder / "manifest.json").exists():
            continue
        pm = attach_lora(reg.model, lcfg)
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        base = pm.get_base_model()
        save_adapter(pm, folder, build_manifest(base, reg.tok, reg.base_spec,
                                                ModelConfig(name=reg.base_spec), lcfg))
        reg.model = pm.unload()  # back to the plain base for the next one
    return folders


def peft_path(reg, fn):
    """Run fn with peft's own mixed-batch LoRA instead of our batched one."""
    reg.fast = False
    try:
        return fn()
    finally:
        reg.fast = True


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default="runs/bench/swap")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()

    from adapters.serving.registry import Registry

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    reg = Registry.from_spec(args.base, device=args.device, capacity=8)
    reg.base_spec = args.base
    folders = make_adapters(reg, work, 8, args.r)
    load_s = []
    for i, f in enumerate(folders):
        start = time.perf_counter()
        reg.load(f"a{i}", f)
        load_s.append(time.perf_counter() - start)
    switch_s = timed(lambda: [reg.model.set_adapter(f"a{i}") for i in range(8)], 3) / 8
    names = [f"a{i}" for i in range(8)]
    kw = {"max_new_tokens": args.new, "ignore_eos": True}
    cases = {
        "mixed": lambda: reg.generate(PROMPTS, names, chat=True, **kw),
        "single": lambda: reg.generate(PROMPTS, "a0", chat=True, **kw),
        "serial": lambda: [reg.generate([p], n, chat=True, **kw) for p, n in zip(PROMPTS, names)],
        "base": lambda: reg.generate(PROMPTS, None, chat=True, **kw),
        "mixed-peft": lambda: peft_path(reg, lambda: reg.generate(PROMPTS, names, chat=True, **kw)),
    }
    tok_s = {k: len(PROMPTS) * args.new / timed(fn, args.repeat) for k, fn in cases.items()}
    res = {"base": args.base, "device": str(next(reg.model.parameters()).device),
           "load_ms_mean": 1000 * statistics.mean(load_s), "switch_ms_mean": 1000 * switch_s,
           "tokens_per_s": tok_s, "mixed_vs_single": tok_s["mixed"] / tok_s["single"],
           "mixed_vs_serial": tok_s["mixed"] / tok_s["serial"], "new_tokens": args.new}
    lines = ["| case | tokens/s | vs single |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / tok_s['single']:.2f}x |" for k, v in tok_s.items()]
    lines += ["", f"adapter load {res['load_ms_mean']:.0f} ms (mean of 8), set_adapter switch "
                  f"{res['switch_ms_mean']:.2f} ms; mixed/single {res['mixed_vs_single']:.2f}x "
                  f"(target >= 0.7x), mixed/serial {res['mixed_vs_serial']:.2f}x; "
                  f"device {res['device']}"]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_swap.md").write_text("\n".join(lines) + "\n")
    (out / "bench_swap.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
