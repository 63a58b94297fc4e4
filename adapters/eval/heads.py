"""Evaluate task-head adapters (classification, regression) and the base's untrained head.

Classification: accuracy, macro-F1 (the mean of the per-class F1, every class of the adapter
counting the same) and the confusion matrix (rows: the true class, columns: the predicted
one, in the adapter's label order). Regression: MSE, MAE and R² (1 - SSE / SST).
The base row is the same base with the adapters switched off: its new head untrained,
initialised from seed 0 as at the start of training. Outputs come from
`training.heads.predictions`, the pooling the training loop uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from ..adapter import load_adapter, read_manifest
from ..adapter.archive import resolve_adapter
from ..config import BASE_NAME, DataConfig
from ..data import build
from ..data.labels import Targets, label_examples
from ..data.packing import Batcher
from ..data.sources import read_rows
from ..errors import ConfigError
from ..heads import load_head_model, model_config_for, task_of
from ..model import default_device, resolve_dtype
from ..training.heads import predictions

EVAL_BATCH = 8


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, k: int) -> dict:
    """accuracy, macro_f1 and confusion[true][predicted] of (N, K) logits against ids (N,)."""
    pred, y = logits.argmax(-1), y.long()
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).double().clamp(min=1)
    recall = tp / confusion.sum(1).double().clamp(min=1)
    f1 = torch.where(tp > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    return {"accuracy": float((pred == y).double().mean()), "macro_f1": float(f1.mean()),
            "confusion": confusion.tolist()}


def regression_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """mse, mae and r2 of (N, 1) outputs against values (N,)."""
    pred, y = logits[:, 0].double(), y.double()
    sse = float(((pred - y) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    return {"mse": sse / len(y), "mae": float((pred - y).abs().mean()),
            "r2": 1 - sse / sst if sst > 0 else 0.0}


def head_metrics(logits: torch.Tensor, y: torch.Tensor, task: dict) -> dict:
    if task.type == "regression":
        return regression_metrics(logits, y)
    return {**classification_metrics(logits, y, len(task.labels)), "labels": task.labels}


def adapters_task(adapters: dict[str, str | Path]) -> dict | None:
    """The task all `adapters` share (None when they are causal-LM adapters); refused when
    they mix tasks or label sets (one base with one head shape serves them all)."""
    tasks = {name: task_of(read_manifest(resolve_adapter(f))) for name, f in adapters.items()}
    found = {json_key(t) for t in tasks.values()}
    if len(found) > 1:
        raise ConfigError("adapters eval: these adapters need different heads (" + "; ".join(
            f"{n}: {t['type'] + ' ' + str(t.get('labels', '')) if t else 'causal LM'}"
            for n, t in tasks.items()) + "); evaluate them in separate runs")
    return next(iter(tasks.values()), None)


def json_key(task: dict | None) -> str:
    return "" if task is None else f"{task.type}|{task.labels}"


def evaluate_heads(base: str, adapters: dict[str, str | Path], datasets: dict[str, DataConfig],
                   task: dict, quantization: str = "none", max_rows: int | None = None,
                   dtype: str = "auto") -> list[dict]:
    """One row per (model, dataset): the task's metrics and the example count."""
    device = default_device()
    cfg, labels = model_config_for(task, name=base, quantization=quantization, dtype=dtype)
    model, tok = load_head_model(cfg, labels, device, seed=0)
    compute = resolve_dtype(dtype, device)
    targets = Targets(task.type, labels)
    batchers = {}
    for name, dcfg in datasets.items():
        dcfg = dataclasses.replace(dcfg, format="label")
        ds = build(dcfg, tok, targets=targets).train.dataset
        if max_rows:
            ds = ds.select(range(min(max_rows, len(ds))))
        batchers[name] = Batcher(ds, EVAL_BATCH, dcfg.max_seq_len, False, tok.pad_token_id)
    peft_model = None
    for name, folder in adapters.items():
        peft_model = load_adapter(peft_model or model, folder, tokenizer=tok, adapter_name=name)
    rows = []
    for mname in [BASE_NAME, *adapters]:
        if mname == BASE_NAME:
            m = peft_model or model
            ctx = peft_model.disable_adapter() if peft_model else contextlib.nullcontext()
        else:
            peft_model.set_adapter(mname)
            m, ctx = peft_model, contextlib.nullcontext()
        with ctx:
            for dname, b in batchers.items():
                logits, y = predictions(m, b.iter_all(), device, compute)
                rows.append({"model": mname, "dataset": dname, "examples": len(y),
                             **head_metrics(logits, y, task)})
    return rows


def predict(adapter: str | Path, data: DataConfig, base: str | None = None,
            quantization: str = "none", dtype: str = "auto",
            max_rows: int | None = None) -> list[dict]:
    """The adapter's prediction for every row of `data` (format label; the label column may
    be absent): {"row", "prediction"} plus, for classification, "probabilities" per class.

    `base` defaults to the manifest's. Rows come back in file order; a row skipped (an empty
    text) has no entry.
    """
    folder = resolve_adapter(adapter)
    manifest = read_manifest(folder)
    task = task_of(manifest)
    if task is None:
        raise ConfigError(f"{folder}: not a task-head adapter (its manifest has no "
                          "classification or regression task); use `adapters generate`")
    device = default_device()
    cfg, labels = model_config_for(task, name=base or manifest.base.name,
                                   quantization=quantization, dtype=dtype)
    model, tok = load_head_model(cfg, labels, device, seed=0)
    model = load_adapter(model, folder, tokenizer=tok)
    rows, _ = read_rows(data.train, data.text_unit)
    rows = rows[:max_rows or None]
    ds, _ = label_examples(rows, dataclasses.replace(data, format="label"), tok,
                           Targets(task.type, labels, labelled=False))
    batcher = Batcher(ds, EVAL_BATCH, data.max_seq_len, False, tok.pad_token_id)
    logits, _ = predictions(model, batcher.iter_all(), device, resolve_dtype(dtype, device))
    out = []
    for i, row in enumerate(ds["row"]):
        if labels is None:
            out.append({"row": row, "prediction": float(logits[i, 0])})
            continue
        probs = torch.softmax(logits[i], -1)
        out.append({"row": row, "prediction": labels[int(probs.argmax())],
                    "probabilities": {n: round(float(p), 6) for n, p in zip(labels, probs)}})
    return out
