"""Chat rendering and masking: which characters of a conversation the loss is counted on.

A conversation becomes a list of segments `(text, trainable)`. Assistant turns are found by
rendering growing prefixes of the conversation with the tokenizer's own chat template and
taking the text each assistant message adds, so any template works, not just known ones.
"""

from __future__ import annotations

Segment = tuple[str, bool]
ROLES = ("system", "user", "assistant")


def _fallback_render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    # ChatML, ending each turn with the tokenizer's own EOS so the model learns to stop.
    end = tokenizer.eos_token or ""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{end}\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text: the tokenizer's chat template, or ChatML when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return _fallback_render(tokenizer, messages, add_generation_prompt)


def _split_at_eos(text: str, eos: str | None) -> list[Segment]:
    """Trainable up to and including the last EOS; what the template adds after it is not."""
    if eos and eos in text:
        cut = text.rindex(eos) + len(eos)
        return [(text[:cut], True), (text[cut:], False)]
    return [(text, True), (eos or "", True)]


def chat_segments(tokenizer, messages: list[dict], train_on_prompt: bool = False) -> list[Segment]:
    """Segments of a whole conversation; every assistant turn is trainable and ends in EOS."""
    segments: list[Segment] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            head = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
            full = render_chat(tokenizer, messages[: i + 1])
            if not head.startswith(done) or not full.startswith(head):
                raise ValueError("the chat template does not render conversations as growing "
                                 "prefixes; cannot locate assistant turns")
            segments.append((head[len(done):], train_on_prompt))
            segments.extend(_split_at_eos(full[len(head):], tokenizer.eos_token))
            done = full
    rest = render_chat(tokenizer, messages)[len(done):]
    if rest:
        segments.append((rest, train_on_prompt))
    return [(t, m) for t, m in segments if t]
