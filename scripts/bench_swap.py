#!/usr/bin/env python
"""Benchmark: many adapters on one base — load/unload, mixed batches vs plain models, load test.

Eight adapters (r=16 on every projection, random non-zero B so each changes the output) on
the embedded default (SmolLM2-135M, or --base). Measured in one process, same prompts:
  load / unload  Registry.load from disk after the first (the first computes the base's
               fingerprint), and unload; mean and max
  mixed        8 prompts, 8 distinct adapters, one batch (batched LoRA)
  merged       the 8 prompts on adapter 0 merged into a copy of the base (no LoRA code at all)
  peft-one     the 8 prompts on adapter 0 through plain peft (one active adapter)
  base         the 8 prompts on the plain base
Throughput = generated tokens / wall seconds (EOS ignored, so every row makes --new tokens).
Target: mixed >= 0.7x merged.

Load test (--clients N for --seconds S, loopback only): each client sends requests one after
another, 3 short (--short tokens) to 1 long (--long tokens), adapters round-robin over the 8,
to a real server; continuous batching vs static batching (requests join only an empty batch).
Reported: tokens/s and p50/p99 latency of short and long requests.
Target: short p99 continuous >= 2x better than static, throughput no lower.

  .venv/bin/python scripts/bench_swap.py                       # ~5 min on 2 CPU cores
  .venv/bin/python scripts/bench_swap.py --clients 6 --seconds 30 --out runs/bench
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
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
        save_adapter(pm, folder, build_manifest(pm.get_base_model(), reg.tok, reg.base_spec,
                                                ModelConfig(name=reg.base_spec), lcfg))
        reg.model = pm.unload()  # back to the plain base for the next one
    return folders


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def swaps(reg, folders: list[Path]) -> dict:
    """Load all eight (the first computes the fingerprint), then unload and reload each."""
    ms = lambda t: 1000 * t  # noqa: E731
    load, unload = [], []
    for i, f in enumerate(folders):
        start = time.perf_counter()
        reg.load(f"a{i}", f)
        load.append(time.perf_counter() - start)
    for i, f in enumerate(folders):
        start = time.perf_counter()
        reg.unload(f"a{i}")
        unload.append(time.perf_counter() - start)
        start = time.perf_counter()
        reg.load(f"a{i}", f)
        load.append(time.perf_counter() - start)
    rest = load[1:]
    return {"first_load_ms": ms(load[0]), "load_ms_mean": ms(statistics.mean(rest)),
            "load_ms_max": ms(max(rest)), "unload_ms_mean": ms(statistics.mean(unload)),
            "unload_ms_max": ms(max(unload)),
            "adapter_mb": (folders[0] / "adapter_model.safetensors").stat().st_size / 1e6}


def throughput(reg, args, folder0: Path) -> dict[str, float]:
    from peft import PeftModel

    from adapters.config import ModelConfig
    from adapters.model import load_base
    from adapters.serving.decode import Request, Sampling, decode

    def reqs(names):
        return [Request(reg.encode(p, chat=True), n, Sampling(args.new, ignore_eos=True))
                for p, n in zip(PROMPTS, names)]

    other, _ = load_base(ModelConfig(name=args.base), args.device)  # a second copy of the base
    merged = PeftModel.from_pretrained(other, str(folder0)).merge_and_unload()
    names = [f"a{i}" for i in range(8)]
    cases = {"mixed": lambda: reg.run(reqs(names)),
             "merged": lambda: decode(merged, reg.tok, reqs([None] * 8), peft=False)}
    tok_s = {k: 8 * args.new / timed(fn, args.repeat) for k, fn in cases.items()}
    merged = None  # free it before the next copy
    other, _ = load_base(ModelConfig(name=args.base), args.device)
    one = PeftModel.from_pretrained(other, str(folder0))
    tok_s["peft-one"] = 8 * args.new / timed(
        lambda: decode(one, reg.tok, reqs([None] * 8), peft=False), args.repeat)
    tok_s["base"] = 8 * args.new / timed(lambda: reg.run(reqs([None] * 8)), args.repeat)
    return tok_s


def load_test(reg, args, continuous: bool) -> dict:
    """N clients against a real server on loopback for a bounded time."""
    import uvicorn

    from adapters.serving.server import create_app

    app = create_app(reg, max_batch=args.clients, max_queue=4 * args.clients,
                     continuous=continuous)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    lat: dict[str, list[float]] = {"short": [], "long": []}
    tokens = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        i = k
        while time.monotonic() < stop_at:
            kind = "long" if i % 4 == 3 else "short"
            body = {"model": f"a{i % 8}", "prompt": PROMPTS[i % 8], "temperature": 0,
                    "max_tokens": args.long if kind == "long" else args.short,
                    "ignore_eos": True}
            start = time.perf_counter()
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
            with lock:
                lat[kind].append(time.perf_counter() - start)
                tokens[0] += reply["usage"]["completion_tokens"]
            i += 1
        conn.close()

    start = time.perf_counter()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=60)

    def pct(xs, q):
        xs = sorted(xs)
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"tokens_per_s": tokens[0] / wall, "requests": sum(map(len, lat.values())),
            **{f"{k}_p{q}_ms": pct(v, q / 100) for k, v in lat.items() for q in (50, 99)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=96)
    ap.add_argument("--work", default="runs/bench/swap")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()

    from adapters.serving.registry import Registry

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    reg = Registry.from_spec(args.base, device=args.device, capacity=8)
    reg.base_spec = args.base
    folders = make_adapters(reg, work, 8, args.r)
    res = {"base": args.base, "device": str(next(reg.model.parameters()).device),
           "swap": swaps(reg, folders)}
    tok_s = res["tokens_per_s"] = throughput(reg, args, folders[0])
    res["mixed_vs_merged"] = tok_s["mixed"] / tok_s["merged"]
    res["load_test"] = {m: load_test(reg, args, m == "continuous")
                        for m in ("continuous", "static")}
    lt = res["load_test"]
    sw = res["swap"]
    lines = ["| case | tokens/s | vs merged |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / tok_s['merged']:.2f}x |" for k, v in tok_s.items()]
    lines += ["", "| batching | tokens/s | requests | short p50 / p99 ms | long p50 / p99 ms |",
              "|---|---|---|---|---|"]
    lines += [f"| {m} | {r['tokens_per_s']:.1f} | {r['requests']} | {r['short_p50_ms']:.0f} / "
              f"{r['short_p99_ms']:.0f} | {r['long_p50_ms']:.0f} / {r['long_p99_ms']:.0f} |"
              for m, r in lt.items()]
    lines += ["", f"adapter ({sw['adapter_mb']:.1f} MB) first load {sw['first_load_ms']:.0f} ms, "
                  f"then load {sw['load_ms_mean']:.1f} ms mean ({sw['load_ms_max']:.1f} max), "
                  f"unload {sw['unload_ms_mean']:.1f} ms mean; mixed/merged "
                  f"{res['mixed_vs_merged']:.2f}x (target >= 0.7x); short p99 static/continuous "
                  f"{lt['static']['short_p99_ms'] / lt['continuous']['short_p99_ms']:.2f}x "
                  f"(target >= 2x); {args.clients} clients x {args.seconds:.0f} s; "
                  f"device {res['device']}"]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_swap.md").write_text("\n".join(lines) + "\n")
    (out / "bench_swap.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
