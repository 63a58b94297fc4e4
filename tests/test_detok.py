"""Incremental detokenising in the decode loop: the streamed pieces are the full decode, never a
replacement character for a character split across tokens, and the decode work per token is
bounded (linear over a reply, not quadratic). The real tiny model and its byte-level tokenizer;
the model's choice of token is scripted so the reply holds the characters under test."""

import pytest
import torch
from transformers import AutoTokenizer

from adapters.config import ModelConfig
from adapters.generation.decode import Request, Sampling, decode
from adapters.generation.detok import Detokenizer
from adapters.model import load_base

# accents (2 bytes), CJK and a check mark (3), emoji (4): byte-level BPE splits them all
TEXT = "héllo wörld 🎉 naïve café ✓ 日本語 — ok 👍🏽 fin."


@pytest.fixture(scope="module")
def base(tiny_gpt2):
    return load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))


class CountingTokenizer:
    """The tokenizer, counting the tokens every `decode` call is given."""

    def __init__(self, tok):
        self.tok, self.decoded, self.calls = tok, 0, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        self.calls += 1
        return self.tok.decode(ids, **kw)


def scripted(model, script: list[int]):
    """A forward that runs the real model, then makes `script[k]` the likeliest k-th token."""
    step = 0

    def forward(reqs, **inputs):
        nonlocal step
        out = model(**inputs)
        logits = torch.zeros_like(out.logits[:, -1:])  # (B, 1, V): finite, one clear winner
        logits[:, 0, script[step]] = 1.0
        out.logits, step = logits, step + 1
        return out

    return forward


def stream(base, script: list[int], tok=None) -> tuple[list[str], str]:
    """(the streamed pieces, the final text) of one greedy row made to generate `script`."""
    model, real = base
    pieces = []
    req = Request(real("x", add_special_tokens=False)["input_ids"],
                  sampling=Sampling(len(script), ignore_eos=True), on_text=pieces.append)
    out = decode(model, tok or real, [req], forward=scripted(model, script))[0]
    assert out.token_ids == script and out.finish_reason == "length"
    return pieces, out.text


def test_streamed_pieces_are_the_full_decode_and_never_split_a_character(base):
    tok = base[1]
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters do span tokens here
    pieces, text = stream(base, ids)
    assert "".join(pieces) == text == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > len(TEXT.split())  # streamed as it goes, not once at the end


def test_a_reply_cut_inside_a_character_ends_as_a_full_decode_does(base):
    tok = base[1]
    ids = tok("ok 🎉", add_special_tokens=False)["input_ids"][:-1]  # the emoji's last byte gone
    pieces, text = stream(base, ids)
    assert text == "".join(pieces) == tok.decode(ids)
    assert text.endswith("\ufffd") and "\ufffd" not in "".join(pieces[:-1])


def test_decode_work_per_token_is_bounded(base):
    """Count the tokens handed to `decode`: a few per generated token, whatever the length
    (decoding the whole reply again at each token would hand over n(n+1)/2)."""
    tok = base[1]
    ids = tok(TEXT * 8, add_special_tokens=False)["input_ids"][:200]
    counts = {}
    for n in (50, 200):
        counting = CountingTokenizer(tok)
        pieces, text = stream(base, ids[:n], counting)
        assert "".join(pieces) == text == tok.decode(ids[:n])
        counts[n] = counting.decoded
    assert counts[200] <= 8 * 200, counts  # quadratic would be 20100
    assert counts[200] <= 5 * counts[50], counts  # 4x the tokens, ~4x the work (not 16x)


def test_the_detokenizer_alone_matches_full_decodes_at_every_length(tiny_tok_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tok_dir)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    for n in range(1, len(ids) + 1):
        d = Detokenizer(tok)
        text = "".join(d.push(i) for i in ids[:n])
        assert not text.endswith("\ufffd")  # nothing unfinished is released early
        assert text + d.flush() == tok.decode(ids[:n])
