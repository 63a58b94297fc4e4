"""One decoding loop for a batch of requests, each with its own adapter and sampling settings.

HF `generate` takes one set of sampling settings and one stop rule for the whole batch and
streams only batches of one; a server batching requests from different users needs each row
to sample, stop and stream on its own, and to join or leave the batch between two tokens.
`Batch` keeps one KV cache for its rows: each newcomer's left-padded prompt is prefilled, then
one forward per new token runs for all rows still going; `decode` runs a fixed set to the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .detok import Detokenizer

log = logging.getLogger("adapters")
PEFT_NO_ADAPTER = "__base__"  # peft's own key for "no adapter" in `adapter_names`
# Below this a temperature is greedy: logits / 1e-40 overflow to inf and softmax gives NaN
# (vLLM uses the same cut-off).
GREEDY_BELOW = 1e-5
SEED_MOD = 2**64  # torch's generators take a 64-bit seed


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
    on_done: Callable[[Output], None] | None = None  # called once, when this row finishes
    cancelled: bool = False  # set when the client went away: the row leaves at the next step
    created: float = field(default_factory=time.monotonic)  # when it arrived (latencies)


@dataclass
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "error"
    prompt_tokens: int
    error: str | None = None  # why this row failed (finish_reason "error"); others go on
    first_token_s: float | None = None  # from arrival to the first generated token
    decode_s: float | None = None  # from the first token to the end


class _Row:
    """Per-request decoding state: tokens so far, text released to the stream, stop checks."""

    def __init__(self, req: Request, tokenizer, device):
        self.req = req
        self.detok = Detokenizer(tokenizer)
        self.ids = self.detok.ids  # the tokens generated so far (EOS not included)
        self.sent = 0  # characters of text already passed to on_text
        self.checked = 0  # characters of text already searched for stop strings
        self.text = ""
        self.finish: str | None = None
        self.error: str | None = None
        self.reported = False  # on_done called
        self.first_at: float | None = None  # when the first token came (monotonic)
        self.stops = tuple(x for x in req.sampling.stop if x)
        self.gen = None
        if _sampled(req.sampling):
            self.gen = torch.Generator(device=device)
            seed = req.sampling.seed
            self.gen.manual_seed(seed % SEED_MOD if seed is not None
                                 else int(torch.seed() % 2**63))

    def push(self, token: int, eos_ids: set[int]) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
        s = self.req.sampling
        if token in eos_ids and not s.ignore_eos:
            self.finish = "stop"
            self.text += self.detok.flush()
        else:
            self.text += self.detok.push(token)  # a few tokens decoded, not all of them
            if len(self.ids) >= s.max_new_tokens:
                self.finish = "length"
                self.text += self.detok.flush()
            cut = self._find_stop()
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
        self._stream()
        self._done()

    def _find_stop(self) -> int:
        """Where the first stop string begins, searching only text not searched before.

        Each step looks at the new tail (plus the longest stop's length - 1 before it), so a
        request's stop checks cost O(new text x stops), not O(all text x stops) per token.
        """
        if not self.stops:
            return -1
        stable = len(self.text.rstrip("\ufffd"))
        longest = max(len(x) for x in self.stops)
        begin = max(0, min(self.checked, stable) - longest + 1)
        self.checked = stable  # an unfinished UTF-8 character is searched once complete
        hits = [i for i in (self.text.find(x, begin) for x in self.stops) if i >= 0]
        return min(hits, default=-1)

    def fail(self, message: str) -> None:
        """End this row only: the rest of the batch goes on."""
        self.finish, self.error = "error", message
        self._done()

    def _done(self) -> None:
        if self.finish is not None and self.req.on_done is not None and not self.reported:
            self.reported = True
            self.req.on_done(self.output())

    def _stream(self) -> None:
        if self.req.on_text is None:
            return
        end = len(self.text)
        if self.finish is None:
            # Hold back any tail that may begin a stop string (the detokenizer already holds
            # back an unfinished UTF-8 character).
            for stop in self.stops:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:k], 0, end):  # no copy of the text
                        end -= k
                        break
        if end > self.sent:
            self.req.on_text(self.text[self.sent:end])
            self.sent = end

    def output(self) -> Output:
        first = self.first_at
        return Output(self.text, self.ids, self.finish or "length", len(self.req.prompt_ids),
                      self.error, None if first is None else first - self.req.created,
                      None if first is None else time.monotonic() - first)


def _sampled(s: Sampling) -> bool:
    """True when the row samples; a temperature too small to divide by is greedy."""
    return s.temperature >= GREEDY_BELOW


def _pick(logits: torch.Tensor, row: _Row) -> int:
    """Next token for one row from its (V,) fp32 logits: greedy, or temperature + top-p."""
    s = row.req.sampling
    if row.gen is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # smallest set reaching top_p
        keep[0] = True  # a top_p that rounds to 0 in fp32 still keeps the likeliest token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=row.gen))


def _step(rows: list[_Row], logits: torch.Tensor, nxt: torch.Tensor, eos_ids: set[int]) -> None:
    """Pick and push each running row's next token; a row that fails ends alone."""
    finite = torch.isfinite(logits).all(-1).tolist()  # (B,)
    for i, row in enumerate(rows):
        if row.finish is not None:
            continue
        if not finite[i]:
            row.fail("the model produced non-finite scores (NaN or inf) for this request; "
                     "the adapter's weights may hold NaN or inf")
            continue
        try:
            nxt[i] = _pick(logits[i], row)
            row.push(int(nxt[i]), eos_ids)
        except Exception as e:  # this row's sampling or callbacks: the others are fine
            log.exception("a request failed while decoding")
            row.fail(f"decoding failed: {type(e).__name__}: {str(e)[:200]}")


Forward = Callable[..., object]  # (rows' requests, **model inputs) -> model output


class Batch:
    """Rows decoding together, one forward per token for all of them; rows join and leave
    between steps (continuous batching).

    A newcomer is prefilled apart (with its own adapter), gives its first token, and its KV
    cache is merged into the batch's: both are left-padded to the longer one, and the
    attention mask hides the padding, so every row's real tokens stay a contiguous suffix. A
    row that finishes leaves at once (its cache rows are dropped, and leading columns no row
    uses any more are trimmed).
    """

    def __init__(self, model, tokenizer, forward: Forward | None = None):
        self.model, self.tok = model, tokenizer
        self.forward = forward or (lambda reqs, **inputs: model(**inputs))
        self.device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, T) of the cached tokens
        self.last = torch.zeros(0, dtype=torch.long)  # (B,) each row's newest token
        self.done: list[_Row] = []  # rows that finished since the caller last took them

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @torch.inference_mode()
    def add(self, requests: list[Request]) -> list[_Row]:
        """Prefill the requests together and let them join; return their rows, in order."""
        rows = [_Row(r, self.tok, self.device) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)  # (b, T) left-padded
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            n = len(r.prompt_ids)
            ids[i, width - n:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        try:
            out = self.forward(requests, input_ids=ids, attention_mask=mask,
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                               past_key_values=cache, use_cache=True)
        except Exception as e:  # only the newcomers fail; the running rows go on
            log.exception("prefill failed")
            return self._fail_all(rows, e)
        nxt = torch.full((len(rows),), self.pad, dtype=torch.long)
        _step(rows, out.logits[:, -1].float(), nxt, self.eos_ids)
        keep = [i for i, r in enumerate(rows) if r.finish is None]
        self.done += [r for r in rows if r.finish is not None]
        if keep:
            self._merge([rows[i] for i in keep], _select(cache, keep), mask[keep], nxt[keep])
        return rows

    @torch.inference_mode()
    def step(self) -> None:
        """One forward for every row: each gets its next token; finished rows leave."""
        if not self.rows:
            return
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        try:
            out = self.forward([r.req for r in self.rows], input_ids=self.last[:, None].to(
                self.device), attention_mask=mask, position_ids=self.mask.sum(-1, keepdim=True),
                past_key_values=self.cache, use_cache=True)
        except Exception as e:  # one bad forward must not kill the worker
            log.exception("generation failed")
            self._fail_all(self.rows, e)
            self._keep([])
            return
        self.mask = mask
        nxt = torch.full((len(self.rows),), self.pad, dtype=torch.long)
        _step(self.rows, out.logits[:, -1].float(), nxt, self.eos_ids)
        self.last = nxt
        self.leave([r for r in self.rows if r.finish is not None])

    @torch.inference_mode()
    def leave(self, rows: list[_Row]) -> None:
        """Take rows out of the batch (finished, or cancelled: failed by the caller first)."""
        if rows:
            gone = {id(r) for r in rows}
            self.done += [r for r in rows if r.finish is not None]
            self._keep([i for i, r in enumerate(self.rows) if id(r) not in gone])

    def take_done(self) -> list[_Row]:
        done, self.done = self.done, []
        return done

    def _fail_all(self, rows: list[_Row], e: Exception) -> list[_Row]:
        for r in rows:
            r.fail(f"generation failed: {type(e).__name__}: {str(e)[:200]}")
        self.done += rows
        return rows

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.last = None, self.mask[:0, :0], self.last[:0]
            return
        self.cache, self.mask, self.last = (_select(self.cache, keep), self.mask[keep],
                                            self.last[keep])
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else self.width
        if first:  # columns no remaining row uses: drop them
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor,
               last: torch.Tensor) -> None:
        if self.cache is None:
            self.rows, self.cache, self.mask, self.last = rows, cache, mask, last
            return
        width = max(self.width, mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):  # (B, H, T, D) each
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)])
        self.last = torch.cat([self.last, last])
        self.rows = self.rows + rows


def _left_pad(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """`t` with zeros in front along `dim` up to `width` (KV: dim -2, masks: dim -1)."""
    n = width - t.shape[dim]
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _select(cache: DynamicCache, keep: list[int]) -> DynamicCache:
    index = torch.tensor(keep, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    return cache


@torch.inference_mode()
def decode(model, tokenizer, requests: list[Request], peft: bool | None = None,
           forward: Forward | None = None) -> list[Output]:
    """Run all requests to completion in one batch; return their outputs in order.

    On a PeftModel each row's adapter is applied in the same forward pass (peft's
    `adapter_names`); `forward` may apply them another way (the registry's batched LoRA).
    """
    if not requests:
        return []
    peft = hasattr(model, "peft_config") if peft is None else peft
    if forward is None and peft:
        def forward(reqs, **inputs):
            return model(**inputs, adapter_names=[r.adapter or PEFT_NO_ADAPTER for r in reqs])
    batch = Batch(model, tokenizer, forward)
    rows = batch.add(requests)
    while batch.rows:
        batch.step()
    return [r.output() for r in rows]
