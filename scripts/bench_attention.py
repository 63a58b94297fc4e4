#!/usr/bin/env python
"""Benchmark: one decoder block's attention, forward + backward, SDPA vs the matmul path.

The shapes of the default model (SmolLM2-135M: 9 query heads, 3 key/value heads, head dim 64)
in bf16, at several row lengths with the same tokens per call (batch x length = --tokens).
Like with like: the same q, k, v and output gradient for both sides, causal, grouped-query
heads handled by each side's own means (SDPA's enable_gqa, our grouped matmuls); each repeat
times both sides back to back, alternating which goes first; the median and the spread
(min-max) of the per-call time are reported. This picks `kernels/attention.py`'s MAX_LEN.

  .venv/bin/python scripts/bench_attention.py
  .venv/bin/python scripts/bench_attention.py --lengths 256 1024 --repeats 30 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from adapters.kernels.attention import matmul_attention


def timed(fn, q, k, v, grad) -> float:
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    t = time.perf_counter()
    fn(q, k, v).backward(grad)
    return time.perf_counter() - t


def sides(d: int):
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    ours = lambda q, k, v: matmul_attention(q, k, v, None, d ** -0.5)  # noqa: E731
    return {"sdpa": sdpa, "matmul": ours}


def measure(length: int, a) -> dict[str, list[float]]:
    b = max(1, a.tokens // length)
    torch.manual_seed(0)
    q = torch.randn(b, a.heads, length, a.head_dim, dtype=torch.bfloat16)
    k, v = (torch.randn(b, a.kv_heads, length, a.head_dim, dtype=torch.bfloat16)
            for _ in range(2))
    grad = torch.randn(b, length, a.heads, a.head_dim, dtype=torch.bfloat16)
    fns = sides(a.head_dim)
    for fn in fns.values():  # warm-up
        timed(fn, q, k, v, grad)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(a.repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[name].append(timed(fns[name], q, k, v, grad))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 768, 1024])
    p.add_argument("--tokens", type=int, default=1024, help="batch x length per call")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"bf16, {a.heads} query / {a.kv_heads} kv heads of {a.head_dim}, {a.tokens} tokens "
          f"per call, causal, forward + backward, {a.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads; ms per call: median (min-max)")
    print("| row length | batch | SDPA ms | matmul ms | speed-up (medians) |\n" + "|---" * 5 + "|")
    for length in a.lengths:
        t = measure(length, a)
        med = {n: statistics.median(v) * 1e3 for n, v in t.items()}
        cell = {n: f"{med[n]:.2f} ({min(v) * 1e3:.2f}-{max(v) * 1e3:.2f})" for n, v in t.items()}
        print(f"| {length} | {max(1, a.tokens // length)} | {cell['sdpa']} | {cell['matmul']} | "
              f"**{med['sdpa'] / med['matmul']:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
