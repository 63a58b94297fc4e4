"""Data pipeline: files -> rows -> segments -> token ids + labels -> packed or padded batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import IGNORE_INDEX, DataConfig
from ..errors import DataError
from ..io import sha256_file
from .formats import SkipRow, check_columns, row_segments
from .labels import Targets, label_examples
from .preference import keep_pairs, pair_segments
from .sources import Row, expand, split_rows
from .sources import check_data as check_data  # for the CLI and preview
from .tokenize import tokenize_segments

log = logging.getLogger(__name__)


@dataclass
class Split:
    dataset: object  # datasets.Dataset: input_ids, labels, row, truncated
    stats: dict = field(default_factory=dict)


@dataclass
class DataBundle:
    train: Split
    eval: Split | None


def _segments(rows: list[Row], cfg: DataConfig, tokenizer) -> tuple[list, dict]:
    segs, skipped = [], {}
    for row in rows:
        try:
            if cfg.format == "preference":  # two examples per row: chosen, rejected
                segs.extend(pair_segments(row, cfg, tokenizer))
            else:
                segs.append(row_segments(row, cfg, tokenizer))
        except SkipRow as why:
            skipped[str(why)] = skipped.get(str(why), 0) + 1
    return segs, skipped


def _split(rows: list[Row], cfg: DataConfig, tokenizer, name: str, cache: bool,
           targets: Targets | None = None) -> Split:
    if not rows:
        raise DataError(f"data.{name}: the dataset is empty (no rows in the files)")
    check_columns(rows, cfg)
    if cfg.format == "label":  # one example per row, its class or value in `target`
        ds, skipped = label_examples(rows, cfg, tokenizer, targets or Targets("regression"))
        return _stats(ds, rows, skipped, len(rows), name)
    segs, skipped = _segments(rows, cfg, tokenizer)
    if not segs:
        raise DataError(f"data.{name}: every one of {len(rows)} rows was skipped ({skipped})")
    ds = tokenize_segments(segs, tokenizer, cfg.max_seq_len, cfg.overlong,
                           chunk=cfg.format == "text", cache=cache)
    if cfg.format == "preference":
        ds = keep_pairs(ds)
    if len(ds) == 0:
        raise DataError(f"data.{name}: every example was dropped: none fits "
                        f"data.max_seq_len={cfg.max_seq_len} with a trainable token "
                        f"(overlong={cfg.overlong}); raise max_seq_len or use overlong: truncate")
    return _stats(ds, rows, skipped, len(segs), name)


def _stats(ds, rows: list[Row], skipped: dict, n_segs: int, name: str) -> Split:
    if len(ds) == 0:
        raise DataError(f"data.{name}: every one of {len(rows)} rows was skipped ({skipped})")
    lengths = [len(x) for x in ds["input_ids"]]
    trainable = sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in ds["labels"])
    stats = {"rows": len(rows), "skipped": skipped, "examples": len(ds),
             "tokens": sum(lengths), "trainable_tokens": trainable,
             "truncated": int(sum(ds["truncated"])),
             "dropped": n_segs - len(set(ds["row"])), "max_len": max(lengths)}
    return Split(ds, stats)


def data_files(cfg: DataConfig) -> list[dict]:
    """Each data file with its size and sha256, for the manifest and the model card."""
    return [{"split": split, "path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for split, spec in (("train", cfg.train), ("eval", cfg.eval)) if spec
            for f in expand(spec)]


def build(cfg: DataConfig, tokenizer, seed: int = 0, cache: bool = True,
          targets: Targets | None = None) -> DataBundle:
    """Load, validate and tokenise the train (and eval) data a recipe's `data` section names.

    targets: for format `label`, the class names (None: regression values).
    """
    rows, eval_rows = split_rows(cfg, seed)
    train = _split(rows, cfg, tokenizer, "train", cache, targets)
    # an eval file that holds no rows is an error, as for train (not a run without eval)
    given = cfg.eval is not None or eval_rows
    ev = _split(eval_rows, cfg, tokenizer, "eval", cache, targets) if given else None
    for name, s in (("train", train), ("eval", ev)):
        if s is not None:
            log.info("%s data: %s", name, s.stats)
    return DataBundle(train, ev)
