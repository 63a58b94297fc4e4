"""Text metrics for generated answers (SQuAD-style normalisation), and which way each metric
of an eval row is better."""

from __future__ import annotations

import re
import string
from collections import Counter

from ..config import HIGHER_IS_BETTER  # noqa: F401 (re-exported: eval's names)

_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> list[str]:
    """Lower-cased tokens without punctuation and articles."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
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
    import sacrebleu  # optional (the `eval` extra): imported only when BLEU is asked for

    return float(sacrebleu.sentence_bleu(pred, [ref]).score)
