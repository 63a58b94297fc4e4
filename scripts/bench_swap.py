#!/usr/bin/env python
"""Benchmark: many adapters on one base — loads cold and warm, in process and over HTTP; mixed
batches against single-adapter models; continuous against static batching under load.

Eight adapters (r=16 on every projection, random non-zero B so each changes the output) on
the embedded default (SmolLM2-135M, or --base). Measured, same prompts:
  load / unload  Registry.load in this process, after the first (which fingerprints the
               base): cold (the adapter's files dropped from the page cache with
               posix_fadvise(DONTNEED) just before) and warm, interleaved; unload
  HTTP load    POST /v1/adapters (and DELETE) to a real `adapters serve` process over
               loopback, cold and warm alike: what a client of the server waits for
  mixed        8 prompts, 8 distinct adapters, one batch (batched LoRA)
  merged       the 8 prompts on adapter 0 merged into a copy of the base (no LoRA code at all)
  peft-one     the 8 prompts on adapter 0 through plain peft (one active adapter)
  base         the 8 prompts on the plain base
The four generation cases run interleaved, the order rotating each round (--repeat rounds);
throughput = generated tokens / wall seconds (EOS ignored, so every row makes --new tokens).
Target: mixed >= 0.7x merged, the ratio of medians.

Load test (--clients N, loopback only): each client sends requests one after another, 3 short
(--short tokens) to 1 long (--long tokens), adapters round-robin over the 8, to a real server;
continuous batching vs static batching (requests join only an empty batch), in alternating
rounds of --seconds until each has --min-requests short requests, so p99 is a percentile and
not the slowest request. Target: short p99 continuous >= 2x better than static, throughput no
lower.

  .venv/bin/python scripts/bench_swap.py --clients 6 --seconds 30 --out runs/bench
  .venv/bin/python scripts/bench_swap.py --new 4 --repeat 1 --loads 1 --clients 2 \\
      --seconds 3 --min-requests 8 --short 2 --long 4 --out runs/bench-smoke   # smoke
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
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


def spread(xs: list[float], scale: float = 1.0) -> dict:
    """min / median / max (times `scale`) and how many."""
    return {"min": scale * min(xs), "median": scale * statistics.median(xs),
            "max": scale * max(xs), "n": len(xs)}


def drop_cache(folder: Path) -> None:
    """Drop the folder's files from the page cache: the next read comes from the disk."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(folder: Path) -> int | None:
    """Bytes of the folder's files in the page cache (util-linux `fincore`), None without it."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                          *map(str, folder.iterdir())], capture_output=True, text=True)
    return sum(int(x) for x in out.stdout.split()) if out.returncode == 0 else None


def clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def swaps(reg, folders: list[Path], rounds: int) -> dict:
    """The first load (fingerprints the base), then per round and adapter: unload, drop its
    files from the page cache, load (cold), unload, load (warm). Milliseconds."""
    res = {"first_load_ms": 1000 * clock(lambda: reg.load("a0", folders[0])),
           "adapter_mb": (folders[0] / "adapter_model.safetensors").stat().st_size / 1e6}
    for i, f in enumerate(folders[1:], 1):
        reg.load(f"a{i}", f)
    cold, warm, unload = [], [], []
    for _ in range(rounds):
        for i, f in enumerate(folders):
            unload.append(clock(lambda i=i: reg.unload(f"a{i}")))
            drop_cache(f)
            if "cached_after_drop_bytes" not in res:
                res["cached_after_drop_bytes"] = cached_bytes(f)
            cold.append(clock(lambda i=i, f=f: reg.load(f"a{i}", f)))
            unload.append(clock(lambda i=i: reg.unload(f"a{i}")))
            warm.append(clock(lambda i=i, f=f: reg.load(f"a{i}", f)))
    return {**res, "cold": spread(cold, 1000), "warm": spread(warm, 1000),
            "unload": spread(unload, 1000)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def start_server(args, work: Path) -> tuple[subprocess.Popen, int]:
    """`adapters serve` in its own process, loads allowed from `work`; ready when /v1/models
    answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "adapters", "serve", "--base", args.base, "--port", str(port),
           "--adapter-root", str(work), "--capacity", "8"]  # as the in-process registry
    cmd += ["--device", args.device] if args.device else []
    with open(work / "serve.log", "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if call(port, "GET", "/v1/models")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"adapters serve did not start; see {work / 'serve.log'}")


def http_loads(args, work: Path, folders: list[Path]) -> dict:
    """POST /v1/adapters and DELETE /v1/adapters/{name} against `adapters serve`, as `swaps`
    does in process: the first load, the other seven, then per round and adapter an unload,
    a cold load, an unload and a warm load (the other seven stay loaded, as there: the last
    adapter of a rank unloaded narrows the stacks, and the next load widens them again,
    which is a cost of its own, seen in the first load). Milliseconds."""
    proc, port = start_server(args, work)

    def load(i: int) -> float:
        start = time.perf_counter()
        status, body = call(port, "POST", "/v1/adapters", {"name": f"h{i}",
                                                           "path": folders[i].name})
        if status != 200:
            raise RuntimeError(f"POST /v1/adapters: HTTP {status}: {body}")
        return time.perf_counter() - start

    def unload(i: int) -> float:
        return clock(lambda: call(port, "DELETE", f"/v1/adapters/h{i}"))

    try:
        res = {"first_load_ms": 1000 * load(0)}
        for i in range(1, len(folders)):
            load(i)
        cold, warm, gone = [], [], []
        for _ in range(args.loads):
            for i, f in enumerate(folders):
                gone.append(unload(i))
                drop_cache(f)
                cold.append(load(i))
                gone.append(unload(i))
                warm.append(load(i))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {**res, "cold": spread(cold, 1000), "warm": spread(warm, 1000),
            "unload": spread(gone, 1000)}


def throughput(reg, args, folder0: Path) -> dict[str, dict]:
    """Tokens/s of the four cases, interleaved: each round runs every case once, the order
    rotating, after one warm-up each."""
    from peft import PeftModel

    from adapters.config import ModelConfig
    from adapters.generation.decode import Request, Sampling, decode
    from adapters.model import load_base

    def reqs(names):
        return [Request(reg.encode(p, chat=True), n, Sampling(args.new, ignore_eos=True))
                for p, n in zip(PROMPTS, names)]

    merged = PeftModel.from_pretrained(load_base(ModelConfig(name=args.base), args.device)[0],
                                       str(folder0)).merge_and_unload()
    one = PeftModel.from_pretrained(load_base(ModelConfig(name=args.base), args.device)[0],
                                    str(folder0))
    cases = {"mixed": lambda: reg.run(reqs([f"a{i}" for i in range(8)])),
             "merged": lambda: decode(merged, reg.tok, reqs([None] * 8), peft=False),
             "peft-one": lambda: decode(one, reg.tok, reqs([None] * 8), peft=False),
             "base": lambda: reg.run(reqs([None] * 8))}
    names = list(cases)
    for fn in cases.values():
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(clock(cases[name]))
    return {k: spread([8 * args.new / s for s in v]) for k, v in seconds.items()}


def load_round(reg, args, continuous: bool) -> dict:
    """N clients against a real server on loopback for --seconds: latencies and tokens."""
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
    tokens, lock = [0], threading.Lock()
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
    return {"tokens_per_s": tokens[0] / wall, **lat}


def pct(xs: list[float], q: float) -> float:
    """The q-quantile by nearest rank, in milliseconds."""
    xs = sorted(xs)
    return 1000 * xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else float("nan")


def load_test(reg, args) -> dict:
    """Continuous and static rounds alternating until each mode has --min-requests short
    requests (at most --max-rounds rounds each); latencies pooled over a mode's rounds."""
    rounds: dict[str, list[dict]] = {"continuous": [], "static": []}

    def short(mode: str) -> int:
        return sum(len(r["short"]) for r in rounds[mode])

    while min(map(short, rounds)) < args.min_requests and \
            len(rounds["static"]) < args.max_rounds:
        for mode in rounds:
            rounds[mode].append(load_round(reg, args, mode == "continuous"))
    out = {}
    for mode, rs in rounds.items():
        lat = {k: [x for r in rs for x in r[k]] for k in ("short", "long")}
        out[mode] = {"tokens_per_s": spread([r["tokens_per_s"] for r in rs]),
                     **{f"{k}_n": len(v) for k, v in lat.items()},
                     **{f"{k}_p{q}_ms": pct(v, q / 100) for k, v in lat.items()
                        for q in (50, 99)}}
    return out


def _mmm(s: dict, fmt: str = ".1f") -> str:
    return f"{s['min']:{fmt}} / {s['median']:{fmt}} / {s['max']:{fmt}}"


def report(res: dict, args) -> list[str]:
    tok_s, lt, sw, web = res["tokens_per_s"], res["load_test"], res["swap"], res["http"]
    merged = tok_s["merged"]["median"]
    lines = [f"Generation: {args.repeat} interleaved rounds; tokens/s min / median / max; "
             "ratios are of medians, and a target counts as met when that ratio clears it.",
             "", "| case | tokens/s min / median / max | median vs merged |", "|---|---|---|"]
    lines += [f"| {k} | {_mmm(v)} | {v['median'] / merged:.2f}x |" for k, v in tok_s.items()]
    lines += ["", "| batching | rounds | tokens/s min / median / max | short requests | short "
              "p50 / p99 ms | long requests | long p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {r['tokens_per_s']['n']} | {_mmm(r['tokens_per_s'])} | {r['short_n']} | "
              f"{r['short_p50_ms']:.0f} / {r['short_p99_ms']:.0f} | {r['long_n']} | "
              f"{r['long_p50_ms']:.0f} / {r['long_p99_ms']:.0f} |" for m, r in lt.items()]
    lines += ["", "| adapter load / unload, ms | first | cold min / median / max | "
              "warm min / median / max | unload min / median / max |", "|---|---|---|---|---|"]
    lines += [f"| {where} | {s['first_load_ms']:.0f} | {_mmm(s['cold'])} | {_mmm(s['warm'])} | "
              f"{_mmm(s['unload'])} |" for where, s in (("in process (Registry)", sw),
                                                         ("HTTP (adapters serve)", web))]
    ratio = tok_s["mixed"]["median"] / merged
    p99 = lt["static"]["short_p99_ms"] / lt["continuous"]["short_p99_ms"]
    thr = (lt["continuous"]["tokens_per_s"]["median"]
           / lt["static"]["tokens_per_s"]["median"])
    dropped = sw.get("cached_after_drop_bytes")
    lines += ["", f"- mixed / merged: {ratio:.2f}x (target >= 0.7x: "
                  f"{'met' if ratio >= 0.7 else 'missed'})",
              f"- short p99 static / continuous: {p99:.2f}x (target >= 2x: "
              f"{'met' if p99 >= 2 else 'missed'}); throughput continuous / static "
              f"{thr:.2f}x (target >= 1: {'met' if thr >= 1 else 'missed'})",
              f"- adapter {sw['adapter_mb']:.1f} MB; {sw['cold']['n']} cold and "
              f"{sw['warm']['n']} warm loads each way; cold = files dropped from the page "
              "cache (posix_fadvise DONTNEED) just before"
              + (f", {dropped} bytes still cached after the drop" if dropped is not None else "")
              + "; the HTTP load copies the folder into the server's own folder, then loads",
              f"- {args.clients} clients, rounds of {args.seconds:.0f} s, at least "
              f"{args.min_requests} short requests per mode; device {res['device']}"]
    return lines


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5, help="interleaved generation rounds")
    ap.add_argument("--loads", type=int, default=3,
                    help="rounds of cold + warm loads of the 8 adapters, each way")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="one load-test round")
    ap.add_argument("--min-requests", type=int, default=200,
                    help="short requests per batching mode before p99 is taken")
    ap.add_argument("--max-rounds", type=int, default=12, help="load-test rounds per mode")
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=96)
    ap.add_argument("--work", default="runs/bench/swap")
    ap.add_argument("--out", default="runs/bench")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from adapters.serving.registry import Registry

    started = time.perf_counter()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    reg = Registry.from_spec(args.base, device=args.device, capacity=8)
    reg.base_spec = args.base
    folders = make_adapters(reg, work, 8, args.r)
    res = {"base": args.base, "device": str(next(reg.model.parameters()).device),
           "swap": swaps(reg, folders, args.loads), "http": http_loads(args, work, folders)}
    res["tokens_per_s"] = throughput(reg, args, folders[0])
    res["load_test"] = load_test(reg, args)
    res["seconds"] = time.perf_counter() - started
    lines = report(res, args) + [f"- whole run {res['seconds'] / 60:.1f} min"]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_swap.md").write_text("\n".join(lines) + "\n")
    (out / "bench_swap.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
