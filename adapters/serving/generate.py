"""Plain batched greedy generation (the adapter registry and server will build on these)."""

from __future__ import annotations

import torch

from ..data.template import render_chat


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                   adapter_names: list[str] | None = None) -> list[str]:
    """Greedy-decode a batch of already-rendered prompts; return only the new text.

    adapter_names: one per prompt on a PeftModel ("__base__" for none): a mixed batch runs
    in one forward pass per step through peft's mixed-batch LoRA inference.
    """
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the last real token
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         **extra)
    new = out[:, enc["input_ids"].shape[1]:]  # (B, new_tokens)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def chat_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 64) -> list[str]:
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    return generate_texts(model, tokenizer, prompts, max_new_tokens)
