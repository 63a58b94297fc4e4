"""One decoding loop for a batch of requests, each with its own adapter and sampling settings.

HF `generate` takes one set of sampling settings and one stop rule for the whole batch and
streams only batches of one; a server batching requests from different users needs each row
to sample, stop and stream on its own. The loop keeps one KV cache for the batch: a prefill
over the left-padded prompts, then one forward per new token for all rows still running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

PEFT_NO_ADAPTER = "__base__"  # peft's own key for "no adapter" in `adapter_names`


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None = None  # None = the plain base
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None  # called with each new piece of text


@dataclass
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int


class _Row:
    """Per-request decoding state: tokens so far, text released to the stream, stop checks."""

    def __init__(self, req: Request, tokenizer, device):
        self.req, self.tok = req, tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters of text already passed to on_text
        self.text = ""
        self.finish: str | None = None
        self.gen = None
        if req.sampling.temperature > 0:
            self.gen = torch.Generator(device=device)
            seed = req.sampling.seed
            self.gen.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))

    def push(self, token: int, eos_ids: set[int]) -> None:
        s = self.req.sampling
        if token in eos_ids and not s.ignore_eos:
            self.finish = "stop"
        else:
            self.ids.append(token)
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
            cut = min((i for i in (self.text.find(x) for x in s.stop if x) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
            elif len(self.ids) >= s.max_new_tokens:
                self.finish = "length"
        self._stream()

    def _stream(self) -> None:
        if self.req.on_text is None:
            return
        end = len(self.text)
        if self.finish is None:
            # Hold back an unfinished UTF-8 character and any tail that may begin a stop string.
            if self.text.endswith("\ufffd"):
                end -= 1
            for stop in self.req.sampling.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[:end].endswith(stop[:k]):
                        end -= k
                        break
        if end > self.sent:
            self.req.on_text(self.text[self.sent:end])
            self.sent = end

    def output(self) -> Output:
        return Output(self.text, self.ids, self.finish or "length", len(self.req.prompt_ids))


def _pick(logits: torch.Tensor, row: _Row) -> int:
    """Next token for one row from its (V,) fp32 logits: greedy, or temperature + top-p."""
    s = row.req.sampling
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=row.gen))


@torch.inference_mode()
def decode(model, tokenizer, requests: list[Request], peft: bool | None = None) -> list[Output]:
    """Run all requests to completion in one batch; return their outputs in order.

    On a PeftModel each row's adapter is applied in the same forward pass (peft's
    `adapter_names`, or a faster batched path that `model` may have installed).
    """
    if not requests:
        return []
    device = next(model.parameters()).device
    peft = hasattr(model, "peft_config") if peft is None else peft
    rows = [_Row(r, tokenizer, device) for r in requests]
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T) left-padded
    mask = torch.zeros_like(ids)
    for i, r in enumerate(requests):
        n = len(r.prompt_ids)
        ids[i, width - n:] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - n:] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
    extra = {"adapter_names": [r.adapter or PEFT_NO_ADAPTER for r in requests]} if peft else {}
    cache = DynamicCache()
    step_in = ids
    while True:
        out = model(input_ids=step_in, attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True, **extra)
        logits = out.logits[:, -1].float()  # (B, V)
        nxt = torch.full((len(rows),), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            if row.finish is None:
                nxt[i] = _pick(logits[i], row)
                row.push(int(nxt[i]), eos_ids)
        if all(r.finish for r in rows):
            break
        step_in = nxt[:, None].to(device)  # (B, 1); finished rows feed padding, ignored
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
    return [r.output() for r in rows]
