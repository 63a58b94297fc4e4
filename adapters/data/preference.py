"""Format `preference`: a row `(prompt, chosen, rejected)` -> two examples that travel together.

The prompt is text (through `prompt_template`, default "{prompt}\\n") or a list of chat
messages (through the chat template, with the generation prompt); chosen and rejected are text
or assistant messages. Each side becomes prompt + completion + EOS, with labels on the
completion only: both sides share the prompt, so it carries no preference signal.

Row i becomes segments 2i (chosen) and 2i + 1 (rejected). After tokenising (overlong handled
per side as for every format), `keep_pairs` drops a pair whose other side was dropped and adds
the `pair` column; the Batcher keeps a pair's two examples in one batch, chosen first.
"""

from __future__ import annotations

from typing import Any

from ..config import DataConfig
from ..errors import DataError
from .formats import DEFAULT_TEMPLATE, SkipRow, columns_for
from .sources import Row
from .template import ROLES, Segment, chat_segments


def _messages(value: list, where: str, column: str) -> list[dict]:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: column {column!r} message {i} needs a role (one of "
                            f"{', '.join(ROLES)}) and content")
        out.append({"role": m["role"], "content": str(m.get("content") or "")})
    return out


def _completion(value: Any, where: str, column: str) -> str:
    """A side's text: a string, or assistant message(s) as in TRL's conversational format."""
    if isinstance(value, list):
        msgs = _messages(value, where, column)
        if any(m["role"] != "assistant" for m in msgs):
            raise DataError(f"{where}: column {column!r} should hold the assistant's answer "
                            "(text or assistant messages only)")
        value = "".join(m["content"] for m in msgs)
    if value is None:
        value = ""
    if not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: column {column!r} should be text, got {type(value).__name__}")
    if not str(value).strip():
        raise SkipRow(f"empty {column}")
    return str(value)


def _side(prompt: Any, completion: str, cfg: DataConfig, tokenizer, where: str) -> list[Segment]:
    if isinstance(prompt, list):  # chat: the template renders prompt and answer turn
        msgs = _messages(prompt, where, "prompt") + [{"role": "assistant", "content": completion}]
        try:
            segs = chat_segments(tokenizer, msgs, train_on_prompt=False)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from e
        return [(t, m) for t, m in segs]
    if prompt is not None and not isinstance(prompt, (str, int, float)):
        raise DataError(f"{where}: column 'prompt' should be text or a list of messages")
    template = cfg.prompt_template or DEFAULT_TEMPLATE
    return [(template.replace("{prompt}", str(prompt or "")), False), (completion, True),
            (tokenizer.eos_token or "", True)]


def pair_segments(row: Row, cfg: DataConfig, tokenizer) -> tuple[list[Segment], list[Segment]]:
    """(chosen segments, rejected segments) of one row; DataError or SkipRow as formats do."""
    cols, d, w = columns_for(cfg), row.data, row.where
    prompt = d.get(cols["prompt"])
    chosen = _completion(d.get(cols["chosen"]), w, cols["chosen"])
    rejected = _completion(d.get(cols["rejected"]), w, cols["rejected"])
    return (_side(prompt, chosen, cfg, tokenizer, w),
            _side(prompt, rejected, cfg, tokenizer, w))


def keep_pairs(ds):
    """Keep pairs with both sides present (tokenised segment 2i chosen, 2i + 1 rejected).

    Adds the `pair` column (the pair's number); chosen always directly precedes its rejected.
    """
    rows = ds["row"]
    present = set(rows)
    keep = [i for i, r in enumerate(rows) if (r ^ 1) in present]
    return ds.add_column("pair", [r // 2 for r in rows]).select(keep)


def pair_groups(pairs: list[int]) -> list[list[int]]:
    """Example indices grouped by pair, in order: [[chosen, rejected], ...]."""
    groups: list[list[int]] = []
    for i, p in enumerate(pairs):
        if groups and pairs[groups[-1][0]] == p:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
