"""`adapters data preview`: examples exactly as the model sees them, loss tokens marked.

Tokens whose label counts are shown in green on a terminal, or between `[[` and `]]`
otherwise; a summary follows (examples, tokens, trainable tokens, packing efficiency,
truncated and dropped counts). Masking bugs show up here before they cost a training run.
Format `label` (task heads) marks the one token the head reads and shows each example's class
name and id (or its regression value), and the count of each class.
"""

from __future__ import annotations

from collections import Counter

from ..config import IGNORE_INDEX, RunConfig
from ..model import load_tokenizer, resolve_model_path
from . import build, check_data
from .labels import Targets, read_targets
from .packing import pack_bins

_ON, _OFF = "\x1b[1;32m", "\x1b[0m"


def render_marked(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """Decode `ids`, wrapping runs of loss-counted tokens in brackets or colour."""
    out, run, counted = [], [], False
    for tok, lab in zip(ids, labels):
        c = lab != IGNORE_INDEX
        if c != counted and run:
            out.append(_wrap(tokenizer.decode(run), counted, color))
            run = []
        counted = c
        run.append(tok)
    if run:
        out.append(_wrap(tokenizer.decode(run), counted, color))
    return "".join(out)


def _wrap(text: str, counted: bool, color: bool) -> str:
    if not counted:
        return text
    return f"{_ON}{text}{_OFF}" if color else f"[[{text}]]"


def summary(stats: dict, lengths: list[int], max_len: int, packing: bool) -> dict:
    if packing:
        rows = len(pack_bins(lengths, max_len))
        slots = rows * max_len
    else:
        rows = len(lengths)
        slots = rows * max(lengths)  # worst case: every batch padded to the longest
    return {**stats, "batch_rows": rows,
            "packing_efficiency": round(sum(lengths) / max(slots, 1), 4)}


def _header(row: dict, i: int, paired: bool, targets: Targets | None) -> str:
    trunc = ", truncated" if row["truncated"] else ""
    n = len(row["input_ids"])
    if targets is not None:  # a task head: the one marked token is the one it reads
        y = row["target"]
        what = (f"label {targets.names[int(y)]!r} = id {int(y)}" if targets.names is not None
                else f"value {y:g}")
        return f"--- example {i + 1} ({n} tokens, {what}{trunc}) ---"
    side = ("rejected, " if i % 2 else "chosen, ") if paired else ""
    trained = sum(1 for x in row["labels"] if x != IGNORE_INDEX)
    return f"--- example {i + 1} ({side}{n} tokens, {trained} trained{trunc}) ---"


def label_summary(targets: Targets, ys: list[float]) -> dict:
    """Classification: examples per class (`name=count (id i)`, in id order); regression:
    the range and mean of the values."""
    if targets.names is None:
        return {"values": f"min {min(ys):g}, mean {sum(ys) / len(ys):g}, max {max(ys):g}"}
    counts = Counter(int(y) for y in ys)
    return {"labels": ", ".join(f"{name}={counts[i]} (id {i})"
                                for i, name in enumerate(targets.names))}


def preview(cfg: RunConfig, n: int = 3, color: bool = False,
            targets: Targets | None = None) -> str:
    """The first `n` training examples with their loss tokens marked, then a summary.

    targets: for format `label`, the class names (default: read from data.train).
    """
    check_data(cfg.data)  # before the tokenizer: a data mistake costs no model conversion
    if targets is None:
        targets = read_targets(cfg)
    tok = load_tokenizer(resolve_model_path(cfg.model.name))
    data = build(cfg.data, tok, seed=cfg.train.seed, targets=targets)
    ds = data.train.dataset
    parts = []
    paired = "pair" in ds.column_names  # preference data: both sides of each of n pairs
    for i in range(min(2 * n if paired else n, len(ds))):
        row = ds[i]
        parts.append(_header(row, i, paired, targets))
        parts.append(render_marked(tok, row["input_ids"], row["labels"], color))
    lengths = [len(x) for x in ds["input_ids"]]
    s = summary(data.train.stats, lengths, cfg.data.max_seq_len, cfg.data.packing)
    if targets is not None:
        s.update(label_summary(targets, ds["target"]))
    legend = "green" if color else "[[...]]"
    what = "the head reads the" if targets is not None else "loss is counted on the"
    parts.append(f"--- summary ({what} {legend} tokens) ---")
    parts += [f"{k:>20}: {v}" for k, v in s.items()]
    if data.eval is not None:
        parts.append(f"{'eval examples':>20}: {data.eval.stats['examples']}")
    return "\n".join(parts)
