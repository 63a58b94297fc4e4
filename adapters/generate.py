"""Plain batched generation helpers (the adapter registry and server build on these)."""

from __future__ import annotations

import torch

from .data.template import render_chat


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy-decode a batch of already-rendered prompts; return only the new text."""
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the last real token
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[:, enc["input_ids"].shape[1]:]  # (B, new_tokens)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def chat_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 64) -> list[str]:
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    return generate_texts(model, tokenizer, prompts, max_new_tokens)
