"""Format `label`: a row `(text, label)` -> token ids, a pooling marker and a target.

The text is a column (role `text`) or `prompt_template` over several columns
(`"{title}: {body}"`, each `{name}` a column of the row). The label column (role `label`) holds
a class (a string or an integer) for `model.task: classification`, mapped to an id through the
run's label names (`Targets.names`), or a number for `regression`.

An example's token labels are all IGNORE_INDEX but its last token's, which marks the position
the head pools (the last real token, where a causal decoder has read the whole text); the
class id or the value is the `target` column. No EOS is appended: the pooled token is the
text's own last token, as in transformers' `*ForSequenceClassification` with right padding.
Overlong texts keep their first `max_seq_len` tokens (`overlong: drop` drops them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import datasets

from ..config import IGNORE_INDEX, DataConfig, RunConfig
from ..errors import DataError
from .formats import columns_for
from .sources import Row, read_rows

_FIELD = re.compile(r"\{(\w+)\}")
MAX_LABELS = 10_000  # more distinct labels than this is a regression column, not classes


@dataclass
class Targets:
    """What the label column means: `names` (class i is names[i]) or None for regression."""
    task: str  # classification | regression
    names: list[str] | None = None
    labelled: bool = True  # False (predict): the rows need no label column; targets are NaN


def _label_key(value) -> tuple:
    """Sort integers numerically, then strings: ["2", "10"] -> 2 before 10."""
    s = str(value)
    return (0, int(s), "") if re.fullmatch(r"-?\d+", s) else (1, 0, s)


def label_names(rows: list[Row], cfg: DataConfig, num_labels: int | None = None) -> list[str]:
    """The class names of a label column, in id order.

    Integer labels 0..K-1 keep their value as id (K = num_labels or the largest + 1);
    other labels are sorted (integers numerically, then strings) and numbered in that order.
    """
    col = columns_for(cfg)["label"]
    seen = set()
    for row in rows:
        v = row.data.get(col)
        if v is None or isinstance(v, (list, dict, bool)) or str(v).strip() == "":
            raise DataError(f"{row.where}: column {col!r} should hold a class label (text or "
                            f"an integer), got {v!r}")
        seen.add(str(v).strip())
        if len(seen) > MAX_LABELS:
            raise DataError(f"{row.where}: more than {MAX_LABELS} distinct labels in column "
                            f"{col!r}: for numbers use model.task: regression")
    names = sorted(seen, key=_label_key)
    if all(re.fullmatch(r"\d+", n) for n in names):  # ids already
        k = max(int(n) for n in names) + 1
        if num_labels is not None and num_labels < k:
            raise DataError(f"data.train: label {k - 1} needs model.num_labels >= {k}, "
                            f"got {num_labels}")
        return [str(i) for i in range(num_labels or k)]
    if num_labels is not None and num_labels != len(names):
        raise DataError(f"data.train: {len(names)} distinct labels {names[:10]} but "
                        f"model.num_labels={num_labels}; drop model.num_labels or fix the data")
    return names


def _text(row: Row, cfg: DataConfig) -> str:
    cols, d = columns_for(cfg), row.data
    if cfg.prompt_template:
        def field(m: re.Match) -> str:
            name = cols["text"] if m[1] == "text" else m[1]
            if name not in d:
                raise DataError(f"{row.where}: data.prompt_template names column {m[1]!r}; "
                                f"the row has {list(d)}")
            return str(d[name] if d[name] is not None else "")
        return _FIELD.sub(field, cfg.prompt_template)
    if cols["text"] not in d:
        raise DataError(f"{row.where}: format 'label' needs the text column {cols['text']!r} "
                        f"(the row has {list(d)}); map it with data.columns: {{text: NAME}} or "
                        "write data.prompt_template over several columns")
    v = d[cols["text"]]
    if isinstance(v, (list, dict)):
        raise DataError(f"{row.where}: column {cols['text']!r} should be text")
    return "" if v is None else str(v)


def _target(row: Row, cfg: DataConfig, targets: Targets) -> float:
    col = columns_for(cfg)["label"]
    v = row.data.get(col)
    if not targets.labelled:
        return math.nan
    if targets.names is None:  # regression
        try:
            x = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            raise DataError(f"{row.where}: column {col!r} should be a finite number for "
                            f"model.task: regression, got {v!r}")
        return x
    name = str(v).strip() if v is not None else ""
    if name not in targets.names:
        raise DataError(f"{row.where}: label {name!r} is not one of the training labels "
                        f"{targets.names[:20]}")
    return float(targets.names.index(name))


def label_examples(rows: list[Row], cfg: DataConfig, tokenizer, targets: Targets):
    """A datasets.Dataset: input_ids, labels (the pooling marker), target, row, truncated;
    and {reason: count} of the rows skipped."""
    texts = [_text(r, cfg) for r in rows]
    ys = [_target(r, cfg, targets) for r in rows]
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    out = {"input_ids": [], "labels": [], "target": [], "row": [], "truncated": []}
    skipped: dict[str, int] = {}
    for i, (ids, y) in enumerate(zip(enc, ys)):
        if not ids:
            skipped["empty text"] = skipped.get("empty text", 0) + 1
            continue
        truncated = len(ids) > cfg.max_seq_len
        if truncated and cfg.overlong == "drop":
            skipped["overlong"] = skipped.get("overlong", 0) + 1
            continue
        ids = ids[:cfg.max_seq_len]
        out["input_ids"].append(ids)
        out["labels"].append([IGNORE_INDEX] * (len(ids) - 1) + [0])  # 0: any non-ignored id
        out["target"].append(y)
        out["row"].append(i)
        out["truncated"].append(truncated)
    return datasets.Dataset.from_dict(out), skipped


def read_targets(cfg: RunConfig) -> Targets | None:
    """What a `label` recipe's label column means: class names in id order, read from
    data.train (classification), or regression values; None for the other formats."""
    if cfg.data.format != "label":
        return None
    if cfg.model.task == "regression":
        return Targets("regression")
    if cfg.data.train is None:
        return Targets("classification", [])  # data.build says what is missing
    rows, _ = read_rows(cfg.data.train, cfg.data.text_unit)
    return Targets("classification", label_names(rows, cfg.data, cfg.model.num_labels))
