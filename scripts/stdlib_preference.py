"""Build the stdlib preference data for recipes/smollm2-pydoc-dpo.yaml (DPO on real text).

Each pair: prompt = a question about a stdlib function or class with its signature (as in the
demo's pydoc-qa), chosen = the first paragraph of its real docstring, rejected = the first
paragraph of another object's docstring (a fixed, different one from another module). Train
and eval are held out by module, as in the demo.

    python scripts/stdlib_preference.py runs/demo/data/pydoc-pref --train 256 --eval 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from adapters.demo.datasets import MODULES, is_eval_module, pydoc_rows
from adapters.io import atomic_write_text


def pairs(rows: list[dict], limit: int) -> list[dict]:
    """Pair each row with the docstring of the row half the list away (another module)."""
    rows = rows[:limit] if limit else rows
    out = []
    for i, r in enumerate(rows):
        j = (i + len(rows) // 2) % len(rows)
        while rows[j]["module"] == r["module"] or rows[j]["output"] == r["output"]:
            j = (j + 1) % len(rows)
        out.append({"prompt": r["input"], "chosen": r["output"], "rejected": rows[j]["output"],
                    "module": r["module"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=256, help="pairs in train.jsonl (0: all)")
    ap.add_argument("--eval", type=int, default=64, help="pairs in eval.jsonl (0: all)")
    args = ap.parse_args()
    train, ev = [], []
    for m in MODULES:
        (ev if is_eval_module(m) else train).extend(pydoc_rows(m))
    # Interleave modules so a prefix of the list spans many of them.
    key = lambda r: (hash_order(r["input"]), r["input"])  # noqa: E731
    train, ev = sorted(train, key=key), sorted(ev, key=key)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows, n in (("train", train, args.train), ("eval", ev, args.eval)):
        text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs(rows, n))
        atomic_write_text(args.out / f"{name}.jsonl", text)
        print(f"{args.out / f'{name}.jsonl'}: {text.count(chr(10))} pairs")


def hash_order(text: str) -> int:
    """A stable shuffle key (Python's hash() changes between runs)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


if __name__ == "__main__":
    main()
