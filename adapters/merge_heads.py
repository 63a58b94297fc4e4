"""Merging a task-head adapter: the LoRA folded into the decoder, the trained head kept.

The base loads through `AutoModelForSequenceClassification` with the adapter's labels
(heads.load_head_model). peft's `merge_and_unload` folds the LoRA into the decoder and puts
the adapter's copy of the head (`modules_to_save`) where the new, untrained one was, so the
folder written is a plain `*ForSequenceClassification` model: its config carries num_labels,
id2label / label2id, problem_type and pad_token_id, and the head is its `score` (or
`classifier`).

The check compares what the head says, not the vocabulary's logits: on held-out texts, the
max difference of the head's outputs and, for classification, the mean KL between the class
probabilities of base + adapter and of the merged model (and how often they pick the same
class); for regression the max difference of the predicted value decides. The pooling is the
training loop's (training/heads.py: each text's last token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import IGNORE_INDEX, ModelConfig
from .heads import labels_of, load_head_model
from .training.heads import pooled_logits


@dataclass
class HeadVerification:
    """How closely the merged model's head follows base + adapter's, over `texts` texts."""
    task: str  # classification | regression
    max_logit_diff: float  # max |ref - merged| over every output (the value, for regression)
    mean_kl: float | None  # classification: mean KL(ref || merged) of the class probabilities
    same_prediction: float  # the fraction of texts given the same class (1.0 for regression)
    texts: int

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def problem(self, max_kl: float, max_diff: float) -> str | None:
        """Why the merge fails the check, or None. `not <=` also catches NaN."""
        if self.max_logit_diff != self.max_logit_diff:
            return "an output is not finite"
        if self.task == "regression":
            if not self.max_logit_diff <= max_diff:
                return (f"max difference of the predicted value {self.max_logit_diff:.4g} > "
                        f"{max_diff}")
            return None
        if not self.mean_kl <= max_kl:
            return (f"mean KL of the class probabilities {self.mean_kl:.4g} > {max_kl}, max "
                    f"logit difference {self.max_logit_diff:.4g}")
        return None

    def summary(self) -> str:
        """One line for the console."""
        if self.task == "regression":
            return (f"max difference of the predicted value {self.max_logit_diff:.3g} over "
                    f"{self.texts} texts")
        return (f"max head logit difference {self.max_logit_diff:.3g}, mean KL of the class "
                f"probabilities {self.mean_kl:.3g}, same class on "
                f"{self.same_prediction:.0%} of {self.texts} texts")


def load_head_base(task: dict, cfg: ModelConfig):
    """(model, tokenizer) on CPU: the base `cfg` describes (quantized or not) with a new head
    of the adapter's shape. Its initial values do not matter: the adapter brings its head."""
    return load_head_model(dataclasses.replace(cfg, task=task.type), labels_of(task),
                           device="cpu")


def _outputs(model, ids: torch.Tensor) -> torch.Tensor:
    """(K,) head outputs for one text `ids` (1, T), pooled at its last token."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = 0  # any id that is not IGNORE_INDEX marks the pooled position
    return pooled_logits(model, {"input_ids": ids, "labels": labels}).float()[0]


@torch.no_grad()
def compare_heads(ref, merged, batches: list[torch.Tensor], task: dict) -> HeadVerification:
    """Head outputs of `ref` (base + adapter) and `merged` on each text of `batches`."""
    max_diff, kl_sum, same = 0.0, 0.0, 0
    for ids in batches:
        a, b = _outputs(ref, ids), _outputs(merged, ids)  # (K,) each
        diff = float((a - b).abs().max())  # NaN when either side is not finite
        max_diff = diff if diff != diff or diff > max_diff else max_diff
        if task.type == "classification":
            pa, pb = F.log_softmax(a, -1), F.log_softmax(b, -1)
            kl_sum += float((pa.exp() * (pa - pb)).sum())
            same += int(a.argmax() == b.argmax())
    n = max(len(batches), 1)
    if task.type == "regression":
        return HeadVerification("regression", max_diff, None, 1.0, len(batches))
    return HeadVerification("classification", max_diff, kl_sum / n, same / n, len(batches))
