"""The training objective, chosen once in `setup()`: what a step's loss is normalised by, the
loss of one micro-batch, the step's extra metrics, evaluation, and any work on the data before
the first step. `step()` and `evaluate()` call these and name no objective.

    Supervised   sft: next-token loss per trainable token (causal LM), or a task head's loss
                 per example (classification / regression); heads.py, loss.py
    Preference   dpo / orpo on chosen/rejected pairs, normalised per pair; objectives.py,
                 reference.py (DPO's reference log-probs, computed once per run)

A step sums each micro-batch's `micro_loss` (already divided by the step's normalisers,
which are summed over micro-batches and ranks first), so accumulation and ranks equal one big
batch for every objective.
"""

from __future__ import annotations

import torch

from ..config import RunConfig, TrainConfig
from . import heads, objectives, reference
from .distributed import Dist
from .loss import autocast_for


class Supervised:
    """sft: the LM's next-token loss, or a task head's cross-entropy / squared error."""

    name = "sft"

    def prepare(self, model, data, cfg: RunConfig, dist: Dist, device: str,
                dtype: torch.dtype, pad_id: int, resume: bool, progress: bool):
        """The data the run trains on (the same object when nothing is added to it)."""
        return data

    def normalisers(self, micro: list[dict]) -> list[int]:
        """Counts the step's loss is divided by besides `counted` (summed over ranks)."""
        return []

    def micro_loss(self, model, batch: dict, counted: int, norms: list[int],
                   sums: dict[str, float]) -> torch.Tensor:
        """This micro-batch's share of the step's loss (differentiable). counted: the step's
        trainable tokens (or head examples); sums: metric sums this call adds to."""
        return heads.batch_loss(model, batch) / max(counted, 1)

    def metrics(self, sums: dict[str, float], norms: list[int], dist: Dist,
                device: str) -> dict[str, float]:
        """The step's extra metrics from the sums its micro-batches added up."""
        return {}

    def evaluate(self, model, batches, device: str, dtype: torch.dtype) -> dict[str, float]:
        """Loss and the objective's metrics over the eval split's batches."""
        return heads.mean_loss(model, batches, device, dtype)


class Preference(Supervised):
    """dpo / orpo: a loss per chosen/rejected pair (objectives.py)."""

    def __init__(self, t: TrainConfig):
        self.t, self.name = t, t.objective

    def prepare(self, model, data, cfg, dist, device, dtype, pad_id, resume, progress):
        if self.t.objective != "dpo":  # ORPO has no reference
            return data
        # the base's log-probs once per run (train.dpo_reference), not in every step
        return reference.cache(model, data, cfg, dist, device, dtype, pad_id, resume, progress)

    def normalisers(self, micro):
        return objectives.step_counts(self.t, micro)  # [pairs, chosen completion tokens]

    def micro_loss(self, model, batch, counted, norms, sums):
        return objectives.preference_loss(model, batch, self.t, norms, sums)

    def metrics(self, sums, norms, dist, device):
        return objectives.step_metrics(sums, norms, dist, device)

    def evaluate(self, model, batches, device, dtype):
        return objectives.evaluate_pairs(model, batches, self.t, device,
                                         lambda: autocast_for(device, dtype))


def for_config(cfg: RunConfig) -> Supervised:
    """The run's objective, from train.objective."""
    if cfg.train.objective in ("dpo", "orpo"):
        return Preference(cfg.train)
    return Supervised()
