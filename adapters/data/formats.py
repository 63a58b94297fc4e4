"""Rows -> segments `(text, trainable)` for each data format.

- text: the whole document is trained on;
- prompt_completion: `prompt_template` around the prompt, loss on completion + EOS;
- chat: `messages: [{role, content}]` through the chat template, loss on assistant turns;
- alpaca (instruction/input/output) and sharegpt (conversations: [{from, value}]) are
  presets that map onto prompt_completion and chat;
- preference (prompt/chosen/rejected): two examples per row, see preference.py.
- label (text/label): one example per row with a class or a value, see labels.py.
"""

from __future__ import annotations

from typing import Any

from ..config import DataConfig
from ..errors import DataError
from .sources import Row
from .template import ROLES, Segment, chat_segments

DEFAULT_COLUMNS = {
    "text": {"text": "text"},
    "prompt_completion": {"prompt": "input", "completion": "output"},
    "chat": {"messages": "messages"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "sharegpt": {"conversations": "conversations"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
    "label": {"text": "text", "label": "label"},  # data/labels.py
}
REQUIRED = {"text": ["text"], "prompt_completion": ["prompt", "completion"],
            "chat": ["messages"], "alpaca": ["instruction", "output"],
            "sharegpt": ["conversations"], "preference": ["prompt", "chosen", "rejected"],
            "label": ["label"]}  # text: a column, or prompt_template over several
DEFAULT_TEMPLATE = "{prompt}\n"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant", "model": "assistant"}


class SkipRow(Exception):
    """A row that is valid but carries nothing to train on (e.g. an empty completion)."""


def columns_for(cfg: DataConfig) -> dict[str, str]:
    unknown = set(cfg.columns or {}) - set(DEFAULT_COLUMNS[cfg.format])
    if unknown:
        raise DataError(f"data.columns: {sorted(unknown)} mean nothing for format "
                        f"{cfg.format!r}; its roles are {', '.join(DEFAULT_COLUMNS[cfg.format])}")
    return {**DEFAULT_COLUMNS[cfg.format], **(cfg.columns or {})}


def check_columns(rows: list[Row], cfg: DataConfig) -> None:
    """Fail early, once, when a required column is absent, showing the mapping that fixes it."""
    if not rows:
        return
    cols = columns_for(cfg)
    found = list(rows[0].data)
    missing = [role for role in REQUIRED[cfg.format] if cols[role] not in rows[0].data]
    if missing:
        fix = ", ".join(f"{role}: <one of {found}>" for role in missing)
        raise DataError(
            f"{rows[0].where}: format {cfg.format!r} needs column(s) "
            f"{[cols[r] for r in missing]}, the data has {found}. Map them in the recipe: "
            f"data.columns: {{{fix}}}")


def _text(value: Any, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: column {column!r} should be text, got {type(value).__name__}")
    return str(value)


def _messages(value: Any, where: str, roles: dict[str, str] | None = None) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is not an object")
        if roles is None:
            role, content = m.get("role"), m.get("content")
            allowed = ROLES
        else:
            role, content = roles.get(str(m.get("from")).lower(), m.get("from")), m.get("value")
            allowed = tuple(roles)
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {role!r}; expected one "
                            f"of {', '.join(allowed)}")
        out.append({"role": role, "content": _text(content, where, f"message {i}")})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise SkipRow("no assistant turn with content")
    return out


def _prompt_completion(prompt: str, completion: str, cfg: DataConfig, tokenizer) -> list[Segment]:
    if not completion.strip():
        raise SkipRow("empty completion")
    template = cfg.prompt_template or DEFAULT_TEMPLATE
    return [(template.replace("{prompt}", prompt), cfg.train_on_prompt),
            (completion, True), (tokenizer.eos_token or "", True)]


def _alpaca_prompt(instruction: str, context: str) -> str:
    text = f"### Instruction:\n{instruction}\n\n"
    if context.strip():
        text += f"### Input:\n{context}\n\n"
    return text + "### Response:"


def row_segments(row: Row, cfg: DataConfig, tokenizer) -> list[Segment]:
    """The segments of one row; raises DataError (bad row) or SkipRow (nothing to learn)."""
    cols, d, w = columns_for(cfg), row.data, row.where
    if cfg.format == "text":
        text = _text(d.get(cols["text"]), w, cols["text"])
        if not text.strip():
            raise SkipRow("empty text")
        return [(text, True), (tokenizer.eos_token or "", True)]
    if cfg.format == "prompt_completion":
        return _prompt_completion(_text(d.get(cols["prompt"]), w, cols["prompt"]),
                                  _text(d.get(cols["completion"]), w, cols["completion"]),
                                  cfg, tokenizer)
    if cfg.format == "alpaca":
        prompt = _alpaca_prompt(_text(d.get(cols["instruction"]), w, cols["instruction"]),
                                _text(d.get(cols["input"]), w, cols["input"]))
        return _prompt_completion(prompt, _text(d.get(cols["output"]), w, cols["output"]),
                                  cfg, tokenizer)
    if cfg.format == "chat":
        msgs = _messages(d.get(cols["messages"]), w)
    else:
        msgs = _messages(d.get(cols["conversations"]), w, SHAREGPT_ROLES)
    try:
        return chat_segments(tokenizer, msgs, cfg.train_on_prompt)
    except ValueError as e:
        raise DataError(f"{w}: {e}") from e
