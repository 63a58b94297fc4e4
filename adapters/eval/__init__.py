"""Evaluation: the base and adapters side by side on the same held-out data.

metrics.py: text metrics for generated answers; harness.py: `evaluate` (loss, perplexity,
token and choice accuracy, greedy answers through the generation decode loop); report.py:
tables, results files and the chart; record.py: results into an adapter's manifest and card.
"""

from __future__ import annotations

from .harness import (
    choice_accuracy,
    choice_logprob,
    evaluate,
    generation_scores,
    greedy_answers,
    split_prompt,
    token_accuracy,
)
from .metrics import HIGHER_IS_BETTER, bleu, exact_match, normalize, rouge_l, token_f1
from .record import record_eval
from .report import chart, compare, table, write_results

__all__ = [
    "HIGHER_IS_BETTER", "bleu", "chart", "choice_accuracy", "choice_logprob", "compare",
    "evaluate", "exact_match", "generation_scores", "greedy_answers", "normalize",
    "record_eval", "rouge_l", "split_prompt", "table", "token_accuracy", "token_f1",
    "write_results",
]
