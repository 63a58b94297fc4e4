"""`adapters data preview`: examples exactly as the model sees them, loss tokens marked.

Tokens whose label counts are shown in green on a terminal, or between `[[` and `]]`
otherwise; a summary follows (examples, tokens, trainable tokens, packing efficiency,
truncated and dropped counts). Masking bugs show up here before they cost a training run.
"""

from __future__ import annotations

from ..config import IGNORE_INDEX, RunConfig
from ..model import load_tokenizer, resolve_model_path
from . import build, check_data
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


def preview(cfg: RunConfig, n: int = 3, color: bool = False) -> str:
    """The first `n` training examples with their loss tokens marked, then a summary."""
    check_data(cfg.data)  # before the tokenizer: a data mistake costs no model conversion
    tok = load_tokenizer(resolve_model_path(cfg.model.name))
    data = build(cfg.data, tok, seed=cfg.train.seed)
    ds = data.train.dataset
    parts = []
    paired = "pair" in ds.column_names  # preference data: both sides of each of n pairs
    for i in range(min(2 * n if paired else n, len(ds))):
        row = ds[i]
        side = ("rejected, " if i % 2 else "chosen, ") if paired else ""
        parts.append(f"--- example {i + 1} ({side}{len(row['input_ids'])} tokens, "
                     f"{sum(1 for x in row['labels'] if x != IGNORE_INDEX)} trained"
                     f"{', truncated' if row['truncated'] else ''}) ---")
        parts.append(render_marked(tok, row["input_ids"], row["labels"], color))
    lengths = [len(x) for x in ds["input_ids"]]
    s = summary(data.train.stats, lengths, cfg.data.max_seq_len, cfg.data.packing)
    legend = "green" if color else "[[...]]"
    parts.append(f"--- summary (loss is counted on the {legend} tokens) ---")
    parts += [f"{k:>20}: {v}" for k, v in s.items()]
    if data.eval is not None:
        parts.append(f"{'eval examples':>20}: {data.eval.stats['examples']}")
    return "\n".join(parts)
