"""Evaluate the base and adapters side by side on the same data (one base in memory).

Loss and perplexity are computed exactly as in training (`loss.mean_loss`: the fused loss on
the trainable tokens), so a number means the same thing in metrics.jsonl and here. Adapters
are swapped on one loaded base (peft's set_adapter); the base row runs with adapters disabled.
Greedy answers come from the server's decode loop (`generation.decode`), the one inference path.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapter import load_adapter
from ..config import BASE_NAME, IGNORE_INDEX, DataConfig, ModelConfig
from ..data import build
from ..data.formats import DEFAULT_TEMPLATE, columns_for
from ..data.packing import Batcher
from ..data.sources import read_rows
from ..generation.decode import Request, Sampling, decode
from ..model import load_base, resolve_dtype
from ..training.loss import autocast_for, mean_loss
from .heads import adapters_task, evaluate_heads
from .metrics import bleu, exact_match, rouge_l, token_f1
from .preference import preference_scores

GENERATE_BATCH = 8  # prompts decoded together in one batch


@torch.no_grad()
def token_accuracy(model, batches, device: str, dtype: torch.dtype) -> float:
    """Share of trainable tokens whose greedy prediction is right."""
    right = total = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(device, dtype):
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")
                      if k in batch}
            logits = model(**inputs).logits[:, :-1]  # (B, T-1, V): fine at eval sizes
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        right += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
    return right / max(total, 1)


def split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): the prefix before the first trained token, and the first
    contiguous run of trained tokens (the completion or the first assistant turn)."""
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return ids[:first], ids[first:end]


def greedy_answers(model, tok, prompts: list[list[int]], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers (stripped) to prompts given as token ids, through `generation.decode`.

    The model runs as it is: the active adapter of a PeftModel, or none inside its
    `disable_adapter()`; decode passes no per-row adapter names (peft=False).
    """
    answers = []
    for s in range(0, len(prompts), GENERATE_BATCH):
        reqs = [Request(p, sampling=Sampling(max_new_tokens=max_new_tokens))
                for p in prompts[s:s + GENERATE_BATCH]]
        answers += [o.text.strip() for o in decode(model, tok, reqs, peft=False)]
    return answers


def generation_scores(model, tok, dataset, n: int, max_new_tokens: int = 64
                      ) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers to the first `n` prompts: mean EM, token F1, ROUGE-L, and samples."""
    pairs = [split_prompt(dataset[i]["input_ids"], dataset[i]["labels"])
             for i in range(min(n, len(dataset)))]
    pairs = [(p, r) for p, r in pairs if p and r]
    preds = greedy_answers(model, tok, [p for p, _ in pairs], max_new_tokens)
    prompts = [tok.decode(p) for p, _ in pairs]
    refs = [tok.decode(r, skip_special_tokens=True).strip() for _, r in pairs]
    metrics = [("exact_match", exact_match), ("token_f1", token_f1), ("rouge_l", rouge_l)]
    if importlib.util.find_spec("sacrebleu"):
        metrics.append(("bleu", bleu))
    scores = {name: sum(fn(p, r) for p, r in zip(preds, refs)) / max(len(refs), 1)
              for name, fn in metrics}
    samples = [{"prompt": q, "reference": r, "answer": p}
               for q, r, p in list(zip(prompts, refs, preds))[:3]]
    return scores, samples


@torch.no_grad()
def choice_logprob(model, tok, prompt: str, choice: str) -> float:
    """Sum of log p(choice tokens | prompt) under `model`."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c], device=model.device)
    logp = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].float(), -1)  # (len(c), V)
    return float(logp.gather(1, torch.tensor(c, device=model.device)[:, None]).sum())


def choice_accuracy(model, tok, rows: list, dcfg: DataConfig) -> float | None:
    """Multiple choice by log-likelihood ranking, for rows with `choices` and `answer`.

    `answer` is the index of the right choice or its text. None when rows carry no choices.
    """
    rows = [r.data for r in rows if isinstance(r.data.get("choices"), list)]
    if not rows:
        return None
    col = columns_for(dcfg).get("prompt", "input")
    template = dcfg.prompt_template or DEFAULT_TEMPLATE
    right = 0
    for r in rows:
        prompt = template.replace("{prompt}", str(r.get(col, "")))
        scores = [choice_logprob(model, tok, prompt, str(c)) for c in r["choices"]]
        answer = r["answer"] if isinstance(r["answer"], int) else r["choices"].index(
            r["answer"])
        right += int(max(range(len(scores)), key=scores.__getitem__) == answer)
    return right / len(rows)


def _models(base_model, tok, adapters: dict[str, Path]):
    """Yield (name, model, context) for the base and each adapter, swapping on one base."""
    peft_model = None
    for name, folder in adapters.items():
        peft_model = load_adapter(peft_model or base_model, folder, tokenizer=tok,
                                  adapter_name=name)
    yield BASE_NAME, peft_model or base_model, (peft_model.disable_adapter() if peft_model
                                                else contextlib.nullcontext())
    for name in adapters:
        peft_model.set_adapter(name)
        yield name, peft_model, contextlib.nullcontext()


def evaluate(base: str, adapters: dict[str, str | Path], datasets: dict[str, DataConfig],
             quantization: str = "none", max_rows: int | None = None,
             accuracy: bool = True, progress: bool = False, generate: int = 0,
             max_new_tokens: int = 64, dtype: str = "auto",
             held_out: dict[str, int] | None = None) -> list[dict]:
    """One row per (model, dataset): loss, perplexity, token accuracy, token count, and with
    `generate` > 0 exact match, token F1 and ROUGE-L of greedy answers (plus samples).

    dtype: the model's (as `model.dtype` in a recipe); "auto" is bf16 where bf16 is fast.
    held_out: dataset name -> training seed: that dataset is scored on its held-out split
    (data.eval, or the data.eval_fraction rows a run with that seed held out).
    """
    task = adapters_task(adapters)  # task-head adapters: accuracy, F1, MSE... (eval/heads.py)
    if task:
        return evaluate_heads(base, adapters, datasets, task, quantization, max_rows, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_base(ModelConfig(name=base, quantization=quantization, dtype=dtype),
                           device)
    compute = resolve_dtype(dtype, device)
    batchers, tokenised, raw = {}, {}, {}
    for name, dcfg in datasets.items():
        raw[name] = read_rows(dcfg.train, dcfg.text_unit)[0][:max_rows or None]
        bundle = build(dcfg, tok, seed=(held_out or {}).get(name, 0))
        ds = (bundle.eval if name in (held_out or {}) and bundle.eval else bundle.train).dataset
        if max_rows:
            ds = ds.select(range(min(max_rows, len(ds))))
        batchers[name] = Batcher(ds, 8, dcfg.max_seq_len, dcfg.packing, tok.pad_token_id)
        tokenised[name] = ds
    rows, base_logps = [], {}
    bar = tqdm(total=(len(adapters) + 1) * len(datasets), disable=not progress, desc="eval")
    for mname, m, ctx in _models(model, tok, {k: Path(v) for k, v in adapters.items()}):
        with ctx:
            for dname, b in batchers.items():
                r = mean_loss(m, b.iter_all(), device, compute)
                row = {"model": mname, "dataset": dname, "loss": r["loss"],
                       "perplexity": r["perplexity"], "tokens": r["tokens"]}
                if accuracy:
                    row["token_accuracy"] = token_accuracy(m, b.iter_all(), device, compute)
                if "pair" in tokenised[dname].column_names:  # preference data
                    scores, lps = preference_scores(m, b.iter_all(), device, compute,
                                                    mname != BASE_NAME, base_logps.get(dname))
                    row.update(scores)
                    if mname == BASE_NAME:  # the adapters' reference, computed once
                        base_logps[dname] = lps
                mc = choice_accuracy(m, tok, raw[dname], datasets[dname])
                if mc is not None:
                    row["choice_accuracy"] = mc
                if generate:
                    scores, row["samples"] = generation_scores(m, tok, tokenised[dname], generate,
                                                               max_new_tokens)
                    row.update(scores)
                rows.append(row)
                bar.update(1)
    bar.close()
    return rows
