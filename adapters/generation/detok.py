"""Incremental detokenising: a row's token ids -> its text, one piece per new token.

Decoding all of a row's tokens again for every new one costs O(n^2) over a reply. As streaming
detokenisers do, only a short window is decoded each step: the last released token(s) as
context, then the tokens not yet released. The context is decoded twice, alone and with the
new tokens, and the difference is the new text: a tokenizer that drops a word's leading space
at the start of a decode (SentencePiece) or joins bytes across tokens (byte-level BPE) then
gives the same characters it gives in a full decode.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decode shows for bytes that are not (yet) a whole character
# A character is at most 4 UTF-8 bytes, so its bytes span at most 4 tokens: a window still
# ending in REPLACEMENT after this many held tokens holds bytes that are no text at all (a
# diverged model). They are released as decoded, so garbage never makes a step's decode grow.
MAX_HELD = 8


class Detokenizer:
    """The text of a growing token sequence; `push` returns what each new token adds.

    The pieces joined (with `flush` at the end) equal `tokenizer.decode(ids)`. A piece never
    ends inside a character: the bytes of one split across tokens are held back until the
    character is whole. Each step decodes a few tokens, so a reply costs O(n) decode work.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read]: released already, decoded again as context
        self.read = 0  # ids[read:]: not released yet

    def push(self, token: int) -> str:
        """Add a token; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back, as a full decode shows it (an unfinished character at the
        very end is a replacement character there too)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.prefix, self.read)
        after = self._decode(self.prefix, len(self.ids))
        held = len(self.ids) - self.read
        unfinished = len(after) <= len(before) or after.endswith(REPLACEMENT)
        if unfinished and not final and held < MAX_HELD:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self.tok.decode(self.ids[start:end], skip_special_tokens=self.skip)
