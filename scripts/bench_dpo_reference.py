#!/usr/bin/env python
"""Benchmark: DPO's reference log-probs in every step (`in_step`) or once before training
(`cached`), on recipes/smollm2-pydoc-dpo.yaml (the embedded SmolLM2-135M, stdlib pairs).

Like with like: one process, one run, one model. Each repeat times a block of `--steps` steps
on one side, rewinds the step counter and times the same steps (the same batches) on the other;
the side that goes first alternates, and one untimed step per side warms up first. Timings on
a shared machine vary by tens of percent, so each side's figure is the median over repeats of
its block's mean seconds per step, with the spread (min-max) beside it. The cached side's
one-off cost is timed too: the reference forward of every training pair, before step 1; the
break-even is that cost over the seconds it saves per step.

  .venv/bin/python scripts/bench_dpo_reference.py                 # 5 steps x 2 sides x 3 repeats
  .venv/bin/python scripts/bench_dpo_reference.py --steps 8 --repeats 5 --dtype fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adapters.config import load_recipe
from adapters.data import build as build_data
from adapters.data.packing import Batcher
from adapters.training import reference
from adapters.training.trainer import setup, step

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-pydoc-dpo.yaml"


def pairs_file(work: Path, given: str | None, n: int) -> str:
    """The training pairs: given, or built by scripts/stdlib_preference.py."""
    if given:
        return given
    out = work / "pref"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "stdlib_preference.py"), str(out),
                    "--train", str(n), "--eval", "1"], check=True, capture_output=True)
    return str(out / "train.jsonl")


def time_block(run, batcher: Batcher, start: int, n: int) -> tuple[float, float, int]:
    """(wall s per step, CPU s per step, tokens per step) of steps start..start+n-1."""
    run.batcher, run.step = batcher, start
    cpu = time.process_time()
    ms = [step(run) for _ in range(n)]
    cpu = (time.process_time() - cpu) / n  # all threads: less swayed by other processes
    return sum(m["seconds"] for m in ms) / n, cpu, round(sum(m["tokens"] for m in ms) / n)


def summary(wall: list[float], cpu: list[float], tokens: int) -> dict:
    med = statistics.median(wall)
    return {"s_per_step": round(med, 3), "spread": [round(min(wall), 3), round(max(wall), 3)],
            "cpu_s_per_step": round(statistics.median(cpu), 3),
            "cpu_spread": [round(min(cpu), 3), round(max(cpu), 3)],
            "tokens_per_s": round(tokens / med, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=256, help="training pairs (built data)")
    ap.add_argument("--data", help="a preference .jsonl instead of the built stdlib pairs")
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where fast), bf16, fp32")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-ref-"))
    train = pairs_file(work, args.data, args.pairs)
    cfg = load_recipe(RECIPE, [
        f"model.name={args.model}", f"model.dtype={args.dtype}", f"data.train={train}",
        "data.eval=null", f"train.batch_size={args.batch_size}", "train.steps=100000",
        "train.dpo_reference=in_step", "train.schedule=constant", "train.warmup_steps=0",
        f"output.dir={work / 'out'}"])
    run = setup(cfg)
    # The cached side: the same data with each example's reference log-prob beside it.
    cached_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, dpo_reference="cached"))
    data = build_data(cfg.data, run.tokenizer, seed=cfg.train.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    data = reference.cache(run.model, data, cached_cfg, run.dist, run.device, run.dtype,
                           run.tokenizer.pad_token_id, progress=True)
    precompute, precompute_cpu = time.perf_counter() - t0, time.process_time() - c0
    sides = {"in_step": run.batcher,
             "cached": Batcher(data.train.dataset, cfg.train.batch_size, cfg.data.max_seq_len,
                               cfg.data.packing, run.tokenizer.pad_token_id, cfg.train.seed)}
    for b in sides.values():  # warm-up, untimed
        time_block(run, b, 0, 1)
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    tokens = 0
    for r in range(args.repeats):
        start = 1 + r * args.steps
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            s, c, tokens = time_block(run, sides[name], start, args.steps)
            wall[name].append(s)
            cpu[name].append(c)
            print(f"repeat {r + 1} {name:8s} {s:.3f} s/step ({c:.3f} CPU s)", file=sys.stderr)
    res = {k: summary(wall[k], cpu[k], tokens) for k in sides}
    saved = res["in_step"]["s_per_step"] - res["cached"]["s_per_step"]
    n_pairs = len(data.train.dataset) // 2
    out = {"model": args.model, "dtype": str(run.dtype), "pairs": n_pairs,
           "batch_pairs": cfg.train.batch_size, "tokens_per_step": tokens, **res,
           "speedup": round(res["in_step"]["s_per_step"] / res["cached"]["s_per_step"], 3),
           "precompute_s": round(precompute, 1),
           "precompute_ms_per_pair": round(1000 * precompute / max(n_pairs, 1), 1),
           "precompute_cpu_s": round(precompute_cpu, 1),
           "break_even_steps": round(precompute / saved, 1) if saved > 0 else None,
           "steps_per_epoch": run.batcher.batches_per_epoch()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
