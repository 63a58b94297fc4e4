"""`adapters generate` and `adapters serve`: the inference commands."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap

from ..config import BASE_NAME
from ..errors import AdaptersError
from ..heads import is_task_head
from ..serving.registry import Registry
from .common import (
    add_adapter_flags,
    add_base_flags,
    add_max_new_tokens_flag,
    base_of,
    device,
    existing_dir,
    non_negative_float,
    port,
    positive_float,
    positive_int,
    unique,
    unit_interval,
)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    add_base_flags(p)
    add_adapter_flags(p)
    p.add_argument("--device", type=device,
                   help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="load adapters trained on other weights of the same architecture")


def _registry(args: argparse.Namespace, capacity: int | None = None,
              heads=None) -> Registry:
    """The base and its adapters; task-head adapters go to `heads` when given (serve)."""
    adapters = unique(args.adapter, "--adapter")
    base = base_of(args, adapters)
    reg = Registry.from_spec(base, quantization=args.quantization, device=args.device,
                             capacity=capacity or max(8, len(adapters)),
                             allow_base_mismatch=args.allow_base_mismatch)
    for name, path in adapters.items():
        if heads is not None and is_task_head(path):
            heads.load(name, path)
        else:
            reg.load(name, path)
    return reg


def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_model_flags(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user message "
                                                       "with the model's chat template")
    p.add_argument("--with-base", action="store_true", help="also answer with the plain base")
    add_max_new_tokens_flag(p)
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=unit_interval, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeat for more")
    p.add_argument("--json", action="store_true", help="print JSON instead of columns")


def cmd_generate(args: argparse.Namespace) -> int:
    reg = _registry(args)
    models = ([None] if args.with_base or not reg.names() else []) + reg.names()
    # Every (prompt, model) pair in one mixed batch: one forward per new token for all.
    pairs = [(p, m) for p in args.prompt for m in models]
    texts = reg.generate([p for p, _ in pairs], [m for _, m in pairs], chat=args.chat,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, stop=args.stop)
    labels = [m or f"{reg.base_name} (no adapter)" for m in models]
    if args.json:
        print(json.dumps([{"prompt": p, "model": m or reg.base_name, "text": t}
                          for (p, m), t in zip(pairs, texts)], indent=2))
        return 0
    for i, prompt in enumerate(args.prompt):
        print(f"prompt: {prompt}\n")
        print(side_by_side(labels, texts[i * len(models):(i + 1) * len(models)]))
    return 0


def side_by_side(labels: list[str], texts: list[str], width: int | None = None) -> str:
    """Answers in columns when the terminal is wide enough, else one block per model."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    col = (width - 3 * (len(labels) - 1)) // max(1, len(labels))
    if col < 24:
        return "\n".join(f"== {name} ==\n{text}\n" for name, text in zip(labels, texts))
    cols = [[name[:col], "-" * min(col, max(len(name), 8))]
            + [w for line in text.splitlines() or [""]
               for w in (textwrap.wrap(line, col) or [""])]
            for name, text in zip(labels, texts)]
    height = max(len(c) for c in cols)
    rows = [" | ".join(c[i].ljust(col) if i < len(c) else " " * col for c in cols).rstrip()
            for i in range(height)]
    return "\n".join(rows) + "\n"


def _add_serve(p: argparse.ArgumentParser) -> None:
    _add_model_flags(p)
    p.add_argument("--adapter-root", metavar="DIR", type=existing_dir,
                   help="allow POST /v1/adapters to load folders inside DIR (only there)")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=port, default=8000, help="default 8000; 0: any free port")
    p.add_argument("--api-key", default=os.environ.get("ADAPTERS_API_KEY") or None,
                   help="require `Authorization: Bearer KEY` (default: $ADAPTERS_API_KEY)")
    p.add_argument("--base-name", default=BASE_NAME, help="the `model` id of the plain base")
    p.add_argument("--capacity", type=positive_int, default=16,
                   help="adapters kept in memory; the least recently used is evicted")
    p.add_argument("--max-batch", type=positive_int, default=16, help="rows per batch")
    p.add_argument("--max-kv-tokens", type=positive_int, default=65536,
                   help="KV cache budget (rows x longest prompt + max_tokens); beyond it "
                        "requests wait")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="waiting requests before new ones get HTTP 429")
    p.add_argument("--max-tokens-limit", type=positive_int, default=512,
                   help="the largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=positive_int, help="longest prompt accepted")
    p.add_argument("--read-timeout", type=positive_float, default=5.0, metavar="SECONDS",
                   help="a request body that stalls this long between reads gets HTTP 408 "
                        "(default 5)")


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # here, not at the top: fastapi/uvicorn are the optional `serve` extra
        from ..serving.classify import Heads
        from ..serving.server import Limits, context_len, create_app, serve
    except ImportError as e:
        raise AdaptersError(f"adapters serve needs the serve extra: pip install "
                            f"'adapterkit[serve]' ({e})") from None

    # Task-head adapters get their own copy of the same base, with a head (classify.py).
    heads = Heads(base_of(args, unique(args.adapter, "--adapter")), args.quantization,
                  device=args.device, capacity=args.capacity,
                  allow_base_mismatch=args.allow_base_mismatch)
    reg = _registry(args, capacity=args.capacity, heads=heads)
    reg.base_name = args.base_name
    limits = Limits(args.max_tokens_limit, args.max_prompt_tokens, context_len(reg.model),
                    read_timeout_s=args.read_timeout)
    app = create_app(reg, adapter_root=args.adapter_root, api_key=args.api_key, limits=limits,
                     max_batch=args.max_batch, max_queue=args.max_queue,
                     max_kv_tokens=args.max_kv_tokens, heads=heads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    models = [reg.base_name, *reg.names(), *heads.names()]
    page = "playground, runs" if args.adapter_root else "playground"
    print(f"models: {models} on http://{args.host}:{args.port}/v1; the web page ({page}) at "
          f"http://{args.host}:{args.port}/", flush=True)
    serve(app, args.host, args.port)
    return 0


# name -> (add its flags, run it); each one's help line is in the table of cli/__init__.py
COMMANDS = {
    "generate": (_add_generate, cmd_generate),
    "serve": (_add_serve, cmd_serve),
}
