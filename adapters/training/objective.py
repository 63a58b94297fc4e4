"""The training objective, chosen once in `setup()`: what a step's loss is normalised by, the
loss of one micro-batch, the step's extra metrics, evaluation, and any work on the data before
the first step. `step()` and `evaluate()` call these and name no objective.

    Supervised   sft: next-token loss per trainable token (causal LM), or a task head's loss
                 per example (classification / regression); heads.py, loss.py
    Preference   dpo / orpo on chosen/rejected pairs, normalised per pair; objectives.py,
                 reference.py (DPO's reference log-probs, computed once per run)
    Grpo         online RL: the step's batches are rollouts of the live adapter, scored by
                 rewards; grpo.py, grpo_loss.py, rewards.py

A step sums each micro-batch's `micro_loss` (already divided by the step's normalisers,
which are summed over micro-batches and ranks first), so accumulation and ranks equal one big
batch for every objective.
"""

from __future__ import annotations

import torch

from ..config import RunConfig, TrainConfig
from ..data import build as build_data
from ..data.packing import Batcher
from . import heads, objectives, reference
from .distributed import Dist
from .grpo import Grpo
from .loss import autocast_for


def batchers(cfg: RunConfig, data, pad_id: int, d: Dist) -> tuple[Batcher, Batcher | None]:
    """(this rank's training batches, the whole eval split's batches or None)."""
    t = cfg.train
    mk = lambda ds, seed, shard=(0, 1): Batcher(  # noqa: E731
        ds, t.batch_size, cfg.data.max_seq_len, cfg.data.packing, pad_id, seed, shard)
    return (mk(data.train.dataset, t.seed, (d.rank, d.world)),
            mk(data.eval.dataset, 0) if data.eval else None)


class Supervised:
    """sft: the LM's next-token loss, or a task head's cross-entropy / squared error."""

    name = "sft"

    def load_data(self, cfg: RunConfig, tok, targets, d: Dist):
        """(data, this rank's training batches, the eval batches or None); data.train.stats
        and data.eval.stats describe the splits."""
        data = build_data(cfg.data, tok, seed=cfg.train.seed, targets=targets)
        return (data, *batchers(cfg, data, tok.pad_token_id, d))

    def prepare(self, run, resume: bool, progress: bool) -> None:
        """Work on the run's data before its first step (the model is ready)."""

    def micro_batches(self, run, step: int) -> list[dict]:
        """The `grad_accum` batches of optimiser step `step` (a function of the step: resumable)."""
        ga, bpe = run.cfg.train.grad_accum, run.batcher.batches_per_epoch()
        return [run.batcher.batch(*divmod(step * ga + i, bpe)) for i in range(ga)]

    def state(self, dist: Dist) -> dict | None:
        """What a checkpoint must hold to resume this objective exactly (JSON); called on
        every rank (it may gather the ranks' parts)."""
        return None

    def load_state(self, state: dict | None, dist: Dist) -> None:
        """Back to where a checkpoint's `state()` left off."""

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

    def prepare(self, run, resume, progress):
        if self.t.objective != "dpo":  # ORPO has no reference
            return
        # the base's log-probs once per run (train.dpo_reference), not in every step
        pad = run.tokenizer.pad_token_id
        self.data = reference.cache(run.model, self.data, run.cfg, run.dist, run.device,
                                    run.dtype, pad, resume, progress)
        run.batcher, run.eval_batcher = batchers(run.cfg, self.data, pad, run.dist)

    def load_data(self, cfg, tok, targets, d):
        self.data, *rest = super().load_data(cfg, tok, targets, d)
        return (self.data, *rest)

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
    """The run's objective, from train.objective (its settings checked before a model loads)."""
    if cfg.train.objective in ("dpo", "orpo"):
        return Preference(cfg.train)
    if cfg.train.objective == "grpo":
        return Grpo(cfg)
    return Supervised()
