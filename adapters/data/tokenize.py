"""Segments -> token ids and labels (-100 where no loss is counted), with overlong handling.

Tokenisation runs through `datasets.Dataset.map` (batched, fast tokenizer) into an Arrow
cache file keyed on the segments, the tokenizer and the length settings, so a second run on
the same data loads the cache instead of tokenising again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets

from ..config import IGNORE_INDEX
from ..model import adapters_home


def tokenizer_key(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(repr(sorted(vocab.items())).encode())
    h.update(f"{type(tokenizer).__name__}|{tokenizer.eos_token}|{tokenizer.bos_token}".encode())
    return h.hexdigest()[:16]


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer normally prepends BOS (Llama-style), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def fit_length(ids: list[int], labels: list[int], max_len: int, mode: str, chunk: bool
               ) -> list[tuple[list[int], list[int], bool]]:
    """Make one example fit `max_len`: [(ids, labels, truncated)], empty when dropped.

    `chunk` (text format): split a long document into consecutive windows, losing nothing.
    Otherwise `truncate` keeps the whole prompt when it fits and cuts the completion; when
    the prompt alone is too long it keeps the prompt's end, so at least half the window is
    trainable tokens. An example with no trainable token is dropped.
    """
    if len(ids) <= max_len:
        return [(ids, labels, False)] if any(x != IGNORE_INDEX for x in labels[1:]) else []
    if mode == "drop":
        return []
    if chunk:
        out = []
        for s in range(0, len(ids), max_len):
            # the first token of a window has no context
            lab = [IGNORE_INDEX] + labels[s + 1: s + max_len]
            if any(x != IGNORE_INDEX for x in lab):
                out.append((ids[s: s + max_len], lab, True))
        return out
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), None)
    if first is None:
        return []
    start = 0 if first < max_len else first - max_len // 2
    ids, labels = ids[start: start + max_len], labels[start: start + max_len]
    labels[0] = IGNORE_INDEX
    return [(ids, labels, True)] if any(x != IGNORE_INDEX for x in labels) else []


def _encode_batch(batch: dict, tokenizer, max_len: int, mode: str, chunk: bool) -> dict:
    flat = [t for texts in batch["seg_text"] for t in texts]
    enc = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    prefix = _bos_prefix(tokenizer)
    out = {"input_ids": [], "labels": [], "row": [], "truncated": []}
    k = 0
    for row, trains in zip(batch["row"], batch["seg_train"]):
        ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
        for train in trains:
            piece = enc[k]
            k += 1
            ids += piece
            labels += piece if train else [IGNORE_INDEX] * len(piece)
        if labels:
            # never predicted: keeps packed examples from seeing each other
            labels[0] = IGNORE_INDEX
        for fids, flabels, trunc in fit_length(ids, labels, max_len, mode, chunk):
            out["input_ids"].append(fids)
            out["labels"].append(flabels)
            out["row"].append(row)
            out["truncated"].append(trunc)
    return out


def tokenize_segments(segments: list[list[tuple[str, bool]]], tokenizer, max_len: int,
                      mode: str, chunk: bool, cache: bool = True, progress: bool = False):
    """A datasets.Dataset with columns input_ids, labels, row (source index), truncated."""
    key = hashlib.sha256(json.dumps([segments, tokenizer_key(tokenizer), max_len, mode, chunk],
                                    ensure_ascii=False).encode()).hexdigest()[:24]
    cache_dir = adapters_home() / "datasets"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"tok-{key}.arrow"
    if cache and cache_file.is_file():
        return datasets.Dataset.from_file(str(cache_file))
    raw = datasets.Dataset.from_dict({
        "row": list(range(len(segments))),
        "seg_text": [[t for t, _ in s] for s in segments],
        "seg_train": [[m for _, m in s] for s in segments]})
    if not progress:
        datasets.disable_progress_bars()
    try:
        ds = raw.map(_encode_batch, batched=True, batch_size=1000, remove_columns=raw.column_names,
                     fn_kwargs=dict(tokenizer=tokenizer, max_len=max_len, mode=mode, chunk=chunk),
                     cache_file_name=str(cache_file) if cache else None,
                     load_from_cache_file=cache, desc="tokenising")
    finally:
        if not progress:
            datasets.enable_progress_bars()
    return ds


def cache_files() -> list[Path]:
    return sorted((adapters_home() / "datasets").glob("tok-*.arrow"))
