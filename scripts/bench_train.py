#!/usr/bin/env python
"""Benchmark: `adapters train` against HF Trainer + peft, as shipped and as tuned, like with like.

Three sides per case, each run its own subprocess (clean peak memory), interleaved, repeated:
ours (`adapters train`), HF default (Trainer + peft as a user's script runs them) and HF tuned
(every switch an HF user has: SWITCHES in bench_train_sides.py; --switches measures each
alone). All run with use_cache=False: left on, the model builds a KV cache in every training
forward and HF skips its packed-sequence detection, so the padding-free collator's examples
attend to each other; the padding-free cases check that first and refuse to time a baseline
that fails. Cases (bench_train_sides.CASES):
  a-256, a-1024  fixed-length text: stdlib source in windows of 256 / 1024 tokens, bf16
  b-padded       variable-length pydoc Q&A, baseline with its padding collator
  b-flat         the same, baseline with HF's padding-free DataCollatorWithFlattening
  c-qlora(-flat) 4-bit nf4 base with bf16 compute, padded / padding-free baseline
--gpu: random-initialised Llama-3.2-1B and Llama-3.1-8B shapes (seq 2048, bf16 and nf4,
gradient checkpointing on every side); --longest: the longest sequence trained in 24 GB.

  .venv/bin/python scripts/bench_train.py --quick              # SmolLM2, 5 cases, 5 repeats
  .venv/bin/python scripts/bench_train.py --quick --switches   # + a row per HF switch
  .venv/bin/python scripts/bench_train.py --models smollm2 gpt2-small --steps 20
  .venv/bin/python scripts/bench_train.py --gpu                # on a CUDA machine
  .venv/bin/python scripts/bench_train.py --jobs               # 4 adapters in one pass vs
                                                               # one by one (bench_jobs.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_train_sides import (
    ALL_CASES,
    CASES,
    DEFAULT,
    FLAT_CHECK,
    FLAT_TOL,
    GPU_CASES,
    HELDOUT,
    SWITCHES,
    WORKERS,
    bf16_peak_flops,
    data_cfg,
    matmul_params,
)

ROOT = Path(__file__).resolve().parents[1]
GPU_SHAPES = {  # the real shapes of the Llama 3 family, random weights
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False),
}
# case -> (ours / baseline speed-up, ours / baseline peak memory at most), of medians; the
# targets stand against the tuned baseline (the default one's ratios are printed beside them)
TARGETS = {"a-256": (1.5, None), "a-1024": (1.5, None), "b-padded": (3.0, None),
           "b-flat": (1.6, None), "c-qlora-flat": (1.5, 0.60)}
QUICK = {"steps": 4, "repeats": 5,
         "cases": ["a-256", "b-padded", "b-flat", "c-qlora", "c-qlora-flat"]}


def model_path(name: str, work: Path, override: str | None = None) -> str:
    from adapters.model import default_model_dir

    if override:
        return override
    if name == "smollm2":
        return str(default_model_dir())
    folder = work / name
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    if name == "gpt2-small":  # GPT-2 small shapes, random init, our tokenizer
        cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(cfg).save_pretrained(folder)
    else:  # a Llama 3 shape: weights made on the GPU at load (no files of 2-16 GB written)
        from transformers import LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rope_theta=5e5,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                          **GPU_SHAPES[name])
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(folder)
        del model
    tok.save_pretrained(folder)
    return str(folder)


def run_worker(kind: str, args: dict) -> dict:
    """One worker process; its reply, with the process's whole wall time (start to exit)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(args)]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return {**json.loads(res.stdout.strip().splitlines()[-1]),
            "wall_s": time.perf_counter() - start}


def liger_on(gpu: bool) -> bool:
    """The tuned baseline gets Liger where ours would use it: CUDA with liger-kernel."""
    return gpu and importlib.util.find_spec("liger_kernel") is not None


def probe_attention(args: dict, cases: list[str], fixed: str | None) -> dict[str, dict]:
    """case -> {attention: seconds per forward+backward} (bench_train_sides.probe_attention,
    one batch per distinct dataset / length / batch / collator, on the bf16 base), or
    {fixed: 0} when --tuned-attn fixes it."""
    if fixed:
        return {c: {fixed: 0.0} for c in cases}
    shape = {c: (*ALL_CASES[c][:3], ALL_CASES[c][4]) for c in cases}  # quantization aside
    first = {v: c for c, v in reversed(shape.items())}
    probe = run_worker("probe", {**args, "cases": list(first.values())})
    if "error" in probe:
        print(f"attention probe failed ({probe['error']}): tuned baseline gets sdpa")
    return {c: probe.get(first[shape[c]], {"sdpa": 0.0}) for c in cases}


def sides_for(attn: str, a) -> dict[str, tuple[str, dict]]:
    """side -> (worker, baseline switches): ours, HF default, HF tuned, [default + one switch]"""
    tuned = {"attn": attn, "input_cast": False, "liger": liger_on(a.gpu)}
    sides = {"ours": ("ours", {}), "HF default": ("baseline", {}),
             "HF tuned": ("baseline", tuned)}
    if a.switches:
        for name, (change, _) in SWITCHES.items():
            if name != "liger" or liger_on(a.gpu):
                sides[f"HF +{name}"] = ("baseline", change)
    return sides


def check_padding_free(args: dict, sides: dict, allow: bool) -> dict:
    """Run check_flat for the attentions the baselines use; drop (unless `allow`) a baseline
    whose padding-free batches let examples attend to each other. Returns the check."""
    attns = sorted({{**DEFAULT, **s}["attn"] for k, s in sides.values() if k == "baseline"})
    res = run_worker("check", {**args, "attns": attns})
    if "error" in res:
        print(f"  padding-free check failed to run: {res['error']}")
        return res
    for key, diff in res["max_abs_diff"].items():
        attn, cache = key.split("/")
        ok = diff <= FLAT_TOL
        print(f"  padding-free check ({FLAT_CHECK} examples, fp32) {attn}, {cache}: per-example "
              f"loss max |flattened - alone| = {diff:.2e}: "
              f"{'isolated' if ok else 'examples attend across each other'}", flush=True)
        if ok or cache == "use_cache=True" or allow:
            continue
        for name in [n for n, (k, s) in sides.items()
                     if k == "baseline" and {**DEFAULT, **s}["attn"] == attn]:
            print(f"  ASSERTION FAILED: {name} is not padding-free-equal; not timed "
                  "(--allow-contaminated times it anyway)")
            del sides[name]
    return res


def compare(args: dict, sides: dict, repeats: int) -> dict:
    """Every side `repeats` times, interleaved, the order rotating each round."""
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    names = list(sides)
    for r in range(repeats):
        for side in names[r % len(names):] + names[:r % len(names)]:
            kind, settings = sides[side]
            # the held-out scoring once per side: the same seeds train the same adapter
            res = run_worker(kind, {**args, "side": side.replace(" ", "-"),
                                    "settings": settings, "heldout": args["heldout"] and r == 0})
            if "error" not in res:
                res["tokens_per_s"] = res["tokens"] / max(res["seconds"], 1e-9)
            runs[side].append(res)
    return {side: pool(rs) for side, rs in runs.items()}


def pool(rs: list[dict]) -> dict:
    """min / median / max tokens/s over the repeats; the rest from the first run, peak memory
    the largest of any run."""
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return rs[0]
    tps = [r["tokens_per_s"] for r in ok]
    return {**ok[0], "tokens_per_s": statistics.median(tps), "min": min(tps), "max": max(tps),
            "tokens_per_s_all": [round(x, 1) for x in tps], "failed_runs": len(rs) - len(ok),
            "wall_s_all": [r["wall_s"] for r in ok],
            "tokens_per_step": statistics.median(r["tokens_per_step"] for r in ok),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok)}


def main() -> None:
    if "--jobs" in sys.argv:  # many adapters in one pass: scripts/bench_jobs.py
        sys.argv.remove("--jobs")
        import bench_jobs

        bench_jobs.main()
        return
    a = parse_args()
    if a.worker:
        res = WORKERS[a.worker[0]](json.loads(a.worker[1]))
        print(json.dumps(res))
        return
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    started, peak = time.perf_counter(), bf16_peak_flops()
    print(like_with_like(a), flush=True)
    for files in {ALL_CASES[c][:2]: c for c in a.cases}.values():  # once, for every worker
        data_cfg(files, out, build=True)
    results = []
    for model in a.models:
        path = model_path(model, out, a.model_path if model == "smollm2" else None)
        base = {"model": model, "model_path": path, "steps": a.steps, "work": str(out),
                "ckpt": a.gpu, "same_allocator": a.same_allocator,
                "heldout": not (a.no_heldout or a.gpu)}
        probe = probe_attention({**base, "case": a.cases[0]}, a.cases, a.tuned_attn)
        for case in a.cases:
            results.append(run_case({**base, "case": case}, probe[case], a, peak, path))
    write_report(out, results, peak, a, time.perf_counter() - started)


def run_case(args: dict, probe: dict, a, peak: float, path: str) -> dict:
    attn = min(probe, key=probe.get)  # the tuned baseline's: the faster in the probe
    sides = sides_for(attn, a)
    print(f"\n## {args['model']} / {args['case']}: {', '.join(sides)} (tuned attention: "
          f"{attn})", flush=True)
    check = (check_padding_free(args, sides, a.allow_contaminated)
             if ALL_CASES[args["case"]][4] == "flat" else None)
    row = {"model": args["model"], "case": args["case"], "attn": attn, "probe": probe,
           "liger": liger_on(a.gpu), "flat_check": check,
           "sides": compare(args, sides, a.repeats)}
    for side, kind in (("ours", "ours"), ("HF default", "baseline")) if a.longest else ():
        row["sides"][side]["longest_seq"] = run_worker(
            "longest", {**args, "side": kind}).get("longest_seq")
    summarise(row, peak, matmul_params(path))
    print("\n".join(format_case(row)), flush=True)
    return row


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"SmolLM2, {len(QUICK['cases'])} cases, {QUICK['steps']} steps, "
                        f"{QUICK['repeats']} repeats")
    p.add_argument("--gpu", action="store_true", help="Llama 3 1B/8B shapes on CUDA")
    p.add_argument("--models", nargs="+", default=["smollm2", "gpt2-small"])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(ALL_CASES))
    p.add_argument("--steps", type=int, help="steps per run; steps 2..N are timed (default 16)")
    p.add_argument("--repeats", type=int, help="interleaved runs of each side (default 5)")
    p.add_argument("--switches", action="store_true",
                   help="also HF default + each single switch, one row each (slower)")
    p.add_argument("--tuned-attn", choices=["sdpa", "eager", "flash_attention_2"],
                   help="the tuned baseline's attention (default: the faster in a probe)")
    p.add_argument("--allow-contaminated", action="store_true",
                   help="time a padding-free baseline even when its check fails")
    p.add_argument("--longest", action="store_true", help="--gpu: also the longest sequence")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--model-path", help="this folder as the smollm2 model (e.g. random weights)")
    p.add_argument("--no-heldout", action="store_true",
                   help="skip scoring the adapters on held-out data (always with --gpu)")
    p.add_argument("--same-allocator", action="store_true",
                   help="give the baselines our loop's malloc setting too (runtime.py)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.models, a.cases = ["smollm2"], QUICK["cases"]
    if a.gpu:
        a.models, a.cases = list(GPU_SHAPES), list(GPU_CASES)
        a.steps = min(a.steps or 10, 10)
    a.steps = a.steps or (QUICK["steps"] if a.quick else 16)
    a.repeats = a.repeats or 5
    if a.steps < 3:
        p.error("--steps must be at least 3 (steps 2..N are timed)")
    return a


def like_with_like(a) -> str:
    dev = "CUDA" if a.gpu else "CPU"
    return "\n".join([
        "# Like with like",
        f"- Every side: the same examples in the same order, LoRA r=16 alpha=32 on every "
        f"attention and MLP projection from the same seed, fp32 adapter weights, base weights "
        f"bf16 (nf4 + bf16 compute in c-qlora*), bf16 autocast, AdamW lr 2e-4 constant, "
        f"use_cache=False, {dev}.",
        "- Tokens per step: every step of every side trains on exactly the examples of our "
        "loop's step (fixed-length: the same full rows of `seq` tokens, nothing packed; "
        "variable-length: the examples of our packed rows, which the baselines pad or "
        "flatten); tokens/step in the table count no padding.",
        f"- Clock: wall time between the ends of optimiser steps 1 and {a.steps} "
        f"({a.steps - 1} steps), a device synchronize on CUDA, the loss logged every step.",
        f"- Repeats: {a.repeats} runs per side, each its own process, interleaved (the order "
        f"rotating each round); tok/s min / median / max; ratios are of MEDIANS. A target "
        f"counts as met when the ratio of medians clears it.",
        "- Ours: fused LoRA, train.attention auto (plain matmuls up to 512 tokens on CPU), "
        "lm_head + loss at label positions only, peft's input cast off, packed rows.",
        "- HF default: Trainer(bf16=True) + peft defaults, attn_implementation='sdpa' (HF's "
        "default), full-vocabulary logits, padding or DataCollatorWithFlattening collator.",
        "- HF tuned: + peft input cast off, the attention the probe found faster"
        + (", Liger kernels" if liger_on(a.gpu) else "")
        + "; the head at label positions only has no HF switch"
        + (" beyond Liger's fused linear CE." if liger_on(a.gpu) else " on CPU."),
        f"- Held-out loss: each side's adapter (and the base) scored by transformers' own loss "
        f"on the same {HELDOUT} examples of the eval split (first repeat's adapter).",
        "- Allocator: ours keeps freed host memory (a glibc malloc setting `adapters train` "
        "makes); the baselines have glibc's defaults"
        + (" and here get it too (--same-allocator)." if a.same_allocator
           else " (--same-allocator gives it them)."),
    ])


def summarise(row: dict, peak: float, params: int) -> None:
    ours = row["sides"]["ours"]
    for s in (s for s in row["sides"].values() if "error" not in s):
        s["peak_fraction"] = s["tokens_per_s"] * 4 * params / peak
        if "error" not in ours:  # ours / this, of medians
            s["speedup"] = ours["tokens_per_s"] / s["tokens_per_s"]
            s["memory_ratio"] = ours["peak_rss_bytes"] / s["peak_rss_bytes"]


def format_case(r: dict) -> list[str]:
    lines = [HEADER]
    ours = r["sides"]["ours"]
    for name, s in r["sides"].items():
        if "error" in s:
            lines.append(f"| {r['model']} | {r['case']} | {name} | error: {s['error']} |")
            continue
        ratio = (f"**{s['speedup']:.2f}x** | **{s['memory_ratio']:.2f}**"
                 if name != "ours" and "speedup" in s else "- | -")
        loss = f"{s['heldout_loss']:.3f}" if "heldout_loss" in s else "-"
        longest = f" (longest seq {s['longest_seq']})" if "longest_seq" in s else ""
        lines.append(
            f"| {r['model']} | {r['case']} | {name} | {s['tokens_per_step']:.0f} | "
            f"{s['min']:.0f} / {s['tokens_per_s']:.0f} / {s['max']:.0f} | {ratio} | "
            f"{s['peak_rss_bytes'] / 1e9:.2f} | {loss} | {100 * s['peak_fraction']:.0f}%"
            f"{longest} |")
    if "base_heldout_loss" in ours:
        lines.append(f"(held-out loss of the base model alone: {ours['base_heldout_loss']:.3f})")
    return lines + switch_lines(r) + target_lines(r)


HEADER = ("| model | case | side | tokens/step | tok/s min / median / max | ours / this "
          "(medians) | ours / this peak memory | peak GB | held-out loss | % of bf16 peak |\n|"
          + "---|" * 10)


def switch_lines(r: dict) -> list[str]:
    """What each HF switch is worth in this case: HF default + that switch / HF default."""
    tps = {k: s["tokens_per_s"] for k, s in r["sides"].items() if "tokens_per_s" in s}
    lines, base = [], tps.get("HF default")

    def _ratio(name: str) -> float | None:
        return tps[name] / base if name in tps and base else None

    probe = r["probe"]
    for name, (_, what) in SWITCHES.items():
        x = _ratio(f"HF +{name}")
        got = (f"{x:.2f}x tok/s (medians, default + it / default)" if x is not None
               else "not measured alone (--switches)")
        if name == "eager" and probe.get("eager"):
            got += (f"; probe, one forward+backward: sdpa {probe['sdpa']:.3f} s, eager "
                    f"{probe['eager']:.3f} s (sdpa / eager {probe['sdpa'] / probe['eager']:.2f}x)")
        if name == "liger" and not r["liger"]:
            got = "off (CUDA with liger-kernel only; ours is off here too)"
        lines.append(f"- switch {name} ({what}): {got}")
    x = _ratio("HF tuned")
    if x is not None:
        lines.append(f"- all switches (HF tuned, attention {r['attn']}) / HF default: "
                     f"{x:.2f}x tok/s (medians)")
    return lines


def target_lines(r: dict) -> list[str]:
    speed, mem = TARGETS.get(r["case"], (None, None))
    lines = []
    for name in ("HF tuned",) if speed else ():
        s = r["sides"].get(name, {})
        if "speedup" not in s:
            continue
        got = [f"speed-up >= {speed}x: {s['speedup']:.2f}x "
               f"{'met' if s['speedup'] >= speed else 'missed'}"]
        if mem is not None:
            got.append(f"peak memory <= {mem:.0%} of HF's: {s['memory_ratio']:.0%} "
                       f"{'met' if s['memory_ratio'] <= mem else 'missed'}")
        lines.append(f"- target vs {name} (ratio of medians): " + "; ".join(got))
    return lines


def write_report(out: Path, results: list[dict], peak: float, a, seconds: float) -> None:
    text = "\n\n".join(
        [f"# Training benchmark\n\n{a.steps} steps per run, {a.repeats} interleaved runs per "
         f"side, measured bf16 matmul peak {peak / 1e9:.0f} GFLOP/s, whole run "
         f"{seconds / 60:.1f} min. Tokens are non-padding tokens.", like_with_like(a)]
        + ["\n".join([f"## {r['model']} / {r['case']}", *format_case(r)]) for r in results])
    (out / "bench_train.md").write_text(text + "\n")
    (out / "bench_train.json").write_text(json.dumps(
        {"peak_flops": peak, "steps": a.steps, "repeats": a.repeats, "seconds": seconds,
         "results": results}, indent=1))
    walls = [w for r in results for s in r["sides"].values() for w in s.get("wall_s_all", [])]
    print(f"\nwhole run {seconds / 60:.1f} min, of which {len(walls)} training processes "
          f"{sum(walls) / 60:.1f} min ({statistics.mean(walls or [0]):.0f} s each on average); "
          f"written: {out / 'bench_train.md'}, {out / 'bench_train.json'}")


if __name__ == "__main__":
    main()
