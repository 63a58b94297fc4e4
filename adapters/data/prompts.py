"""Prompt-only data for online objectives (GRPO): rows -> prompts the model answers itself.

Any format with a prompt works: prompt_completion and preference (`prompt_template` around the
prompt), alpaca (its instruction/input block), chat and sharegpt (the conversation up to its
last assistant turn, rendered with the generation prompt). The answer a row carries, when it
has one (completion, output, chosen, the last assistant turn), is not trained on: it is the
`completion` column a reward may compare with. Every column of the row goes to the rewards
too, under its own name.

`PromptSampler` hands out prompt indices per step as a function of (seed, epoch, index), so a
resumed run draws the same prompts; under torchrun each rank takes every world-th prompt of
the epoch's order.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from ..config import DataConfig
from ..errors import DataError
from .formats import DEFAULT_TEMPLATE, SHAREGPT_ROLES, _alpaca_prompt, _messages, columns_for
from .sources import Row, split_rows
from .template import render_chat

log = logging.getLogger(__name__)

# the role that holds the prompt, per format (text and label rows have none)
PROMPT_ROLE = {"prompt_completion": "prompt", "preference": "prompt", "alpaca": "instruction",
               "chat": "messages", "sharegpt": "conversations"}
ANSWER_ROLE = {"prompt_completion": "completion", "preference": "chosen", "alpaca": "output"}


@dataclass
class Prompt:
    text: str  # what the model sees, template applied
    ids: list[int]
    columns: dict  # the row's columns, plus `completion`: the answer it carries ("" if none)
    where: str  # file:line, for errors that name the row


@dataclass
class PromptSet:
    prompts: list[Prompt]
    stats: dict = field(default_factory=dict)


def _text(value, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise DataError(f"{where}: column {column!r} should be text, got {type(value).__name__}")
    return str(value)


def prompt_of(row: Row, cfg: DataConfig, tokenizer) -> tuple[str, str]:
    """(the prompt as the model sees it, the answer the row carries or "")."""
    cols, d, w = columns_for(cfg), row.data, row.where
    if cfg.format in ("prompt_completion", "preference"):
        prompt = _text(d.get(cols["prompt"]), w, cols["prompt"])
        template = cfg.prompt_template or DEFAULT_TEMPLATE
        answer = cols[ANSWER_ROLE[cfg.format]]
        return template.replace("{prompt}", prompt), _text(d.get(answer), w, answer)
    if cfg.format == "alpaca":
        text = _alpaca_prompt(_text(d.get(cols["instruction"]), w, cols["instruction"]),
                              _text(d.get(cols.get("input", "input")), w, "input"))
        return text, _text(d.get(cols["output"]), w, cols["output"])
    key = cols[PROMPT_ROLE[cfg.format]]
    value = d.get(key)
    if not isinstance(value, list) or not value:
        raise DataError(f"{w}: column {key!r}: expected a non-empty list of messages")
    msgs = _messages(value + [{"role": "assistant", "content": "x", "from": "gpt",
                               "value": "x"}], w, SHAREGPT_ROLES if cfg.format == "sharegpt"
                     else None)[:-1]  # a placeholder answer: a prompt-only chat is fine here
    answer = ""
    if msgs[-1]["role"] == "assistant":
        answer, msgs = msgs[-1]["content"], msgs[:-1]
    if not msgs:
        raise DataError(f"{w}: the conversation has no turn before its answer")
    return render_chat(tokenizer, msgs, add_generation_prompt=True), answer


def _split(rows: list[Row], cfg: DataConfig, tokenizer, room: int, name: str) -> PromptSet:
    if not rows:
        raise DataError(f"data.{name}: the dataset is empty (no rows in the files)")
    role = PROMPT_ROLE.get(cfg.format)
    if role is None:
        raise DataError(f"data.format: {cfg.format} rows have no prompt; train.objective: grpo "
                        "needs prompts (prompt_completion, preference, alpaca, chat, sharegpt)")
    column = columns_for(cfg)[role]
    if column not in rows[0].data:
        raise DataError(f"{rows[0].where}: format {cfg.format!r} takes its prompt from column "
                        f"{column!r}, the data has {list(rows[0].data)}. Map it in the recipe: "
                        f"data.columns: {{{role}: <one of {list(rows[0].data)}>}}")
    out, too_long = [], 0
    for row in rows:
        text, answer = prompt_of(row, cfg, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None
            else tokenizer.eos_token_id]
        if len(ids) > room:
            too_long += 1
            continue
        out.append(Prompt(text, ids, {**row.data, "completion": answer}, row.where))
    if not out:
        raise DataError(f"data.{name}: every one of {len(rows)} prompts is longer than "
                        f"data.max_seq_len - grpo.max_completion_length = {room} tokens")
    stats = {"rows": len(rows), "examples": len(out), "skipped": {"prompt too long": too_long}
             if too_long else {}, "tokens": sum(len(p.ids) for p in out),
             "max_len": max(len(p.ids) for p in out)}
    log.info("%s prompts: %s", name, stats)
    return PromptSet(out, stats)


def build_prompts(cfg: DataConfig, tokenizer, completion_tokens: int,
                  seed: int = 0) -> tuple[PromptSet, PromptSet | None]:
    """The train (and eval) prompts; a prompt must leave room for `completion_tokens`."""
    room = cfg.max_seq_len - completion_tokens
    if room < 1:
        raise DataError(f"data.max_seq_len ({cfg.max_seq_len}) leaves no room for a prompt next "
                        f"to grpo.max_completion_length ({completion_tokens})")
    rows, eval_rows = split_rows(cfg, seed)
    train = _split(rows, cfg, tokenizer, room, "train")
    ev = _split(eval_rows, cfg, tokenizer, room, "eval") if cfg.eval is not None or eval_rows \
        else None
    return train, ev


class PromptSampler:
    """Which prompts micro-batch `index` of `epoch` holds on this rank: `batch_size` of them."""

    def __init__(self, n: int, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = shard
        per_rank = n // self.world
        if per_rank < batch_size:
            raise DataError(f"data.train: {n} prompts give each of {self.world} rank(s) "
                            f"{per_rank}, fewer than train.batch_size ({batch_size}) prompts "
                            "per micro-batch: lower train.batch_size or add prompts")
        self.per_epoch = per_rank // batch_size

    def batches_per_epoch(self) -> int:
        return self.per_epoch

    def positions(self, epoch: int, index: int) -> list[int]:
        """Where batch(epoch, index)'s prompts stand in the epoch's order (all ranks')."""
        first = index * self.batch_size
        return [(first + m) * self.world + self.rank for m in range(self.batch_size)]

    def batch(self, epoch: int, index: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        mine = order[self.rank::self.world]
        return mine[index * self.batch_size:(index + 1) * self.batch_size]
