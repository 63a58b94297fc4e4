"""`adapters merge` and `adapters combine`: an adapter into its base, or adapters into one."""

from __future__ import annotations

import argparse

from ..combine import METHODS, combine
from ..data.sources import read_rows
from ..merge import AGAINST, HeadVerification, merge_adapter, merge_streaming_verified
from .common import DTYPES, adapter_path, add_base_flag, data_source, positive_float, unit_interval

_CHECK_TEXTS = 64  # held-out texts the merge check runs on


def _add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", type=adapter_path,
                   help="adapter folder (or .zip from `adapters pack`)")
    p.add_argument("--out", required=True, help="folder for the merged model")
    add_base_flag(p, "base model (default: the one in the adapter's manifest)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--against", choices=AGAINST, default=AGAINST[0],
                   help="for adapters trained on a 4/8-bit base: merge into the dequantized "
                        "weights training saw (default) or the original full-precision ones")
    p.add_argument("--data", type=data_source,
                   help="held-out text for the check (.txt/.csv/.jsonl; the first column or "
                        "'text')")
    p.add_argument("--max-kl", type=positive_float, default=0.05,
                   help="fail above this mean KL(base+adapter || merged) (default 0.05; for a "
                        "classification head: of its class probabilities)")
    p.add_argument("--max-diff", type=positive_float, default=0.01,
                   help="regression heads: fail when the predicted value moves by more than "
                        "this (default 0.01)")
    p.add_argument("--stream", action="store_true",
                   help="merge tensor by tensor from the base's safetensors (low memory; "
                        "causal-LM adapters only: task heads merge in memory)")
    p.add_argument("--no-verify", action="store_true", help="skip the check")


def _read_texts(path: str) -> list[str]:
    rows, _ = read_rows(path)
    return [str(r.data.get("text") or next(iter(r.data.values()))) for r in rows][:_CHECK_TEXTS]


def cmd_merge(args: argparse.Namespace) -> int:
    data = _read_texts(args.data) if args.data else None
    if args.stream:
        out, result = merge_streaming_verified(args.adapter, args.out, args.base,
                                               not args.no_verify, data, args.max_kl)
    else:
        out, result = merge_adapter(args.adapter, args.out, args.base, args.dtype,
                                    args.against, not args.no_verify, data, args.max_kl,
                                    max_diff=args.max_diff)
    if isinstance(result, HeadVerification):
        print(f"verified: {result.summary()}")
    elif result is not None:
        print(f"verified: max logit difference {result.max_logit_diff:.3g}, mean KL "
              f"{result.mean_kl:.3g}, perplexity base+adapter {result.ppl_reference:.3f} vs "
              f"merged {result.ppl_merged:.3f}")
    print(f"merged model written to {out}")
    return 0


def _add_combine(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", type=adapter_path,
                   help="adapter folders or .zip archives (same base)")
    p.add_argument("--weights", nargs="+", type=float, required=True,
                   help="one weight per adapter, in the same order")
    p.add_argument("--method", choices=METHODS, default="linear")
    p.add_argument("--density", type=unit_interval, default=0.5, help="for ties / dare_*")
    p.add_argument("--out", required=True)


def cmd_combine(args: argparse.Namespace) -> int:
    # combine() checks the adapter and weight counts itself, before it loads the base.
    out = combine(args.adapters, args.weights, args.out, args.method, args.density)
    print(f"combined adapter written to {out}")
    return 0


# name -> (add its flags, run it); each one's help line is in the table of cli/__init__.py
COMMANDS = {
    "merge": (_add_merge, cmd_merge),
    "combine": (_add_combine, cmd_combine),
}
