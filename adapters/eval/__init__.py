"""Evaluate the base and adapters side by side on the same data (one base in memory).

Loss and perplexity are computed exactly as in training (`loss.mean_loss`: the fused loss on
the trainable tokens), so a number means the same thing in metrics.jsonl and here. Adapters
are swapped on one loaded base (peft's set_adapter); the base row runs with adapters disabled.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import importlib.util
import json
import logging
import re
import string
from collections import Counter
from pathlib import Path

import torch

from ..adapter import MANIFEST_FILE, load_adapter, read_manifest
from ..adapter.card import EVAL_KEYS, write_card
from ..config import BASE_NAME, IGNORE_INDEX, DataConfig, ModelConfig
from ..data import build
from ..data.packing import Batcher
from ..io import atomic_write_json
from ..model import load_base, resolve_dtype
from ..train.loss import mean_loss

log = logging.getLogger(__name__)


# ---- text metrics (SQuAD-style normalisation) ----

def normalize(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred), normalize(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over normalised tokens (longest common subsequence)."""
    p, r = normalize(pred), normalize(ref)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def bleu(pred: str, ref: str) -> float:
    """Sentence BLEU (sacrebleu, 0-100); needs the `eval` extra."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(pred, [ref]).score)


HIGHER_IS_BETTER = {"loss": False, "perplexity": False, "token_accuracy": True,
                    "choice_accuracy": True,
                    "exact_match": True, "token_f1": True, "rouge_l": True, "bleu": True}


@torch.no_grad()
def token_accuracy(model, batches, device: str, dtype: torch.dtype) -> float:
    """Share of trainable tokens whose greedy prediction is right."""
    from ..train.loss import autocast_for

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


def generation_scores(model, tok, dataset, n: int, max_new_tokens: int = 64
                      ) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers to the first `n` prompts: mean EM, token F1, ROUGE-L, and samples."""
    from ..serving.generate import generate_texts

    pairs = [split_prompt(dataset[i]["input_ids"], dataset[i]["labels"])
             for i in range(min(n, len(dataset)))]
    pairs = [(p, r) for p, r in pairs if p and r]
    prompts = [tok.decode(p) for p, _ in pairs]
    refs = [tok.decode(r, skip_special_tokens=True).strip() for _, r in pairs]
    preds = []
    for s in range(0, len(prompts), 8):
        preds += generate_texts(model, tok, prompts[s:s + 8], max_new_tokens)
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
    from ..data.formats import DEFAULT_TEMPLATE, columns_for

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
    """Yield (name, model) for the base and each adapter, swapping on one base."""
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
             max_new_tokens: int = 64) -> list[dict]:
    """One row per (model, dataset): loss, perplexity, token accuracy, token count, and with
    `generate` > 0 exact match, token F1 and ROUGE-L of greedy answers (plus samples)."""
    from tqdm.auto import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_base(ModelConfig(name=base, quantization=quantization), device)
    dtype = resolve_dtype("auto", device)
    from ..data.sources import read_rows

    batchers, tokenised, raw = {}, {}, {}
    for name, dcfg in datasets.items():
        raw[name] = read_rows(dcfg.train, dcfg.text_unit)[0][:max_rows or None]
        ds = build(dcfg, tok).train.dataset
        if max_rows:
            ds = ds.select(range(min(max_rows, len(ds))))
        batchers[name] = Batcher(ds, 8, dcfg.max_seq_len, dcfg.packing, tok.pad_token_id)
        tokenised[name] = ds
    rows = []
    bar = tqdm(total=(len(adapters) + 1) * len(datasets), disable=not progress, desc="eval")
    for mname, m, ctx in _models(model, tok, {k: Path(v) for k, v in adapters.items()}):
        with ctx:
            for dname, b in batchers.items():
                r = mean_loss(m, b.iter_all(), device, dtype)
                row = {"model": mname, "dataset": dname, "loss": r["loss"],
                       "perplexity": r["perplexity"], "tokens": r["tokens"]}
                if accuracy:
                    row["token_accuracy"] = token_accuracy(m, b.iter_all(), device, dtype)
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


def table(rows: list[dict], metric: str = "loss") -> str:
    """Markdown table: datasets as rows, models as columns, with the change vs base."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    dsets = list(dict.fromkeys(r["dataset"] for r in rows))
    val = {(r["model"], r["dataset"]): r[metric] for r in rows}
    arrow = "higher is better" if HIGHER_IS_BETTER.get(metric) else "lower is better"
    lines = [f"| {metric} ({arrow}) | " + " | ".join(models) + " |",
             "|---" * (len(models) + 1) + "|"]
    for d in dsets:
        cells = []
        for m in models:
            v, b = val[(m, d)], val.get((BASE_NAME, d))
            rel = f" ({100 * (v / b - 1):+.1f}%)" if b and m != BASE_NAME else ""
            cells.append(f"{v:.4f}{rel}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], out: Path) -> None:
    """results.json (with samples), results.csv (numbers), eval.png and report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    flat = [{k: v for k, v in r.items() if k != "samples"} for r in rows]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    chart(rows, out / "eval.png")
    metrics = [m for m in HIGHER_IS_BETTER if m in flat[0]]
    lines = ["# Evaluation", ""] + [table(rows, m) + "\n" for m in metrics] + [
        "![chart](eval.png)", ""]
    for r in rows:
        for s in r.get("samples", []):
            lines += [f"- **{r['model']}** on {r['dataset']}: {s['prompt'][-120:]!r} -> "
                      f"{s['answer'][:200]!r} (reference {s['reference'][:120]!r})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def compare(rows: list[dict], old: list[dict]) -> str:
    """Deltas of every shared metric against an earlier results.json."""
    before = {(r["model"], r["dataset"]): r for r in old}
    lines = ["| model | dataset | metric | before | now | delta |", "|---|---|---|---|---|---|"]
    for r in rows:
        prev = before.get((r["model"], r["dataset"]))
        for m in HIGHER_IS_BETTER:
            if prev and m in r and m in prev:
                lines.append(f"| {r['model']} | {r['dataset']} | {m} | {prev[m]:.4f} | "
                             f"{r[m]:.4f} | {r[m] - prev[m]:+.4f} |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, metric: str = "loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    dsets = list(dict.fromkeys(r["dataset"] for r in rows))
    val = {(r["model"], r["dataset"]): r[metric] for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [j + i * width for j in range(len(dsets))]
        ax.bar(xs, [val[(m, d)] for d in dsets], width, label=m)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(dsets))], dsets)
    ax.set_ylabel(f"held-out {metric} (lower is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def record_eval(folder: str | Path, model_name: str, rows: list[dict]) -> None:
    """Add `adapters eval` results (this adapter's rows, the base's beside them) to the
    manifest and the card. The weights and their hash are untouched."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    base_rows = {r["dataset"]: r for r in rows if r["model"] == BASE_NAME}
    keep = lambda r: {k: r[k] for k in (*EVAL_KEYS, "tokens") if k in r}  # noqa: E731
    manifest["eval"] = [
        {"dataset": r["dataset"], "adapter": keep(r),
         "base": keep(base_rows[r["dataset"]]) if r["dataset"] in base_rows else None,
         "date": dt.date.today().isoformat()}
        for r in rows if r["model"] == model_name]
    atomic_write_json(Path(folder) / MANIFEST_FILE, manifest)
    write_card(folder, manifest)
