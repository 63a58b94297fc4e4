"""Preference objectives on sequence log-probs: DPO (sigmoid, IPO) and ORPO.

A batch of preference data holds pairs: sequence 2k is pair k's chosen answer, 2k + 1 its
rejected one (`seq` (B, T) says which sequence each token is in; data/packing.py). Each
sequence's log-probability is the sum of its completion tokens' log-probs, computed at label
positions only, chunked (kernels/logprobs.py): full-vocabulary logits never exist.

DPO's reference is the same model with the adapter switched off, under no_grad: no second
model in memory. With train.dpo_reference: cached its log-probs were computed once before
training and come with the batch (`ref_logps` (S,), training/reference.py); in_step, they are
computed in the step, a second forward. With logratios `c = pi(chosen) - ref(chosen)` and
`r = pi(rejected) - ref(rejected)`:
  sigmoid: -log sigmoid(beta (c - r))
  ipo:     (c / |chosen| - r / |rejected| - 1 / (2 beta))^2   (per-token averages, as TRL)
ORPO has no reference: with per-token mean log-probs `a_c`, `a_r`,
  NLL(chosen completion tokens) - lambda log sigmoid(log odds(a_c) - log odds(a_r)),
  log odds(a) = a - log(1 - exp(a)).
The step's loss is the mean over its pairs (ORPO's NLL: over its chosen tokens), across
micro-batches and ranks, so accumulation equals one big batch as for sft.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import IGNORE_INDEX, TrainConfig
from ..errors import TrainingError
from ..kernels.logprobs import token_logprobs
from .distributed import Dist, all_sum
from .loss import head_inputs

# Per-step metrics: each is a sum over pairs, divided by the step's pairs when logged.
PAIR_METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin",
                "logps_chosen", "logps_rejected", "ref_logps_chosen", "ref_logps_rejected")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def label_logprobs(model, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (N,) fp32, keep (B, T-1)) of the N counted label tokens, row-major.

    batch: input_ids, labels (B, T) (HF alignment: position t predicts labels[t + 1]),
    attention_mask, position_ids when packed.
    """
    base = _base(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    labels = batch["labels"][:, 1:]  # (B, T-1)
    keep = labels != IGNORE_INDEX
    h, target = hidden[:, :-1][keep], labels[keep]  # (N, H), (N,)
    h, weight, bias = head_inputs(h, base.get_output_embeddings())
    with torch.autocast(device_type=h.device.type, enabled=False):
        return token_logprobs(h, weight, target, bias, chunk=chunk), keep  # (N,) fp32


def sequence_logprobs(model, batch: dict, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob sums (S,), counted tokens (S,)) of the S sequences of a preference batch.

    batch: as for label_logprobs, and seq (B, T): which sequence each token is in (-1 on
    padding).
    """
    lp, keep = label_logprobs(model, batch, chunk)
    seq = batch["seq"][:, 1:][keep]  # (N,): the sequence each counted token belongs to
    n_seq = int(batch["seq"].max()) + 1
    sums = torch.zeros(n_seq, dtype=lp.dtype, device=lp.device).index_add(0, seq, lp)
    return sums, torch.bincount(seq, minlength=n_seq)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(t: TrainConfig, logps: torch.Tensor, counts: torch.Tensor,
                ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (P,) and per-pair metrics from sequence log-probs (2P,), chosen first.

    The ORPO loss returned here is its odds-ratio term only; the NLL is added by the caller,
    normalised by the step's chosen tokens.
    """
    c, r = logps[0::2], logps[1::2]
    nc, nr = counts[0::2].clamp(min=1), counts[1::2].clamp(min=1)
    m: dict[str, torch.Tensor] = {"logps_chosen": c.detach(), "logps_rejected": r.detach()}
    if t.objective == "dpo":
        dc, dr = c - ref[0::2], r - ref[1::2]
        if t.dpo_loss == "sigmoid":
            losses = -F.logsigmoid(t.dpo_beta * (dc - dr))
        else:  # ipo
            losses = (dc / nc - dr / nr - 1 / (2 * t.dpo_beta)) ** 2
        rc, rr = t.dpo_beta * dc.detach(), t.dpo_beta * dr.detach()
        m.update(ref_logps_chosen=ref[0::2], ref_logps_rejected=ref[1::2])
    else:  # orpo
        ac, ar = c / nc, r / nr
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        losses = -t.orpo_lambda * F.logsigmoid(log_odds)
        rc, rr = t.orpo_lambda * ac.detach(), t.orpo_lambda * ar.detach()
    m.update(rewards_chosen=rc, rewards_rejected=rr, reward_accuracy=(rc > rr).float(),
             reward_margin=rc - rr)
    return losses, m


def reference_logprobs(model, batch: dict) -> torch.Tensor:
    """Sequence log-probs under the base: the adapter switched off, no graph kept."""
    with torch.no_grad(), model.disable_adapter():
        return sequence_logprobs(model, batch)[0]


def batch_reference(model, batch: dict) -> torch.Tensor:
    """The batch's reference log-probs (S,): cached with the data when there, else computed."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    return reference_logprobs(model, batch)


def step_counts(t: TrainConfig, micro: list[dict]) -> list[int]:
    """The step's normalisers: [] for sft; [pairs, chosen completion tokens] for dpo/orpo."""
    if t.objective == "sft":
        return []
    if any("seq" not in b for b in micro):
        raise TrainingError(f"train.objective={t.objective} trains on preference pairs: set "
                            "data.format: preference (columns prompt, chosen, rejected)")
    pairs = sum((int(b["seq"].max()) + 1) // 2 for b in micro)
    chosen = 0
    for b in micro:
        keep = b["labels"][:, 1:] != IGNORE_INDEX
        chosen += int((b["seq"][:, 1:][keep] % 2 == 0).sum())
    return [pairs, chosen]


def preference_loss(model, batch: dict, t: TrainConfig, counts: list[int],
                    sums: dict[str, float]) -> torch.Tensor:
    """This micro-batch's share of the step's loss (differentiable); adds metric sums to `sums`.

    counts: the step's [pairs, chosen tokens] (all micro-batches, all ranks), see step_counts.
    """
    pairs, chosen_tokens = max(counts[0], 1), max(counts[1], 1)
    logps, n = sequence_logprobs(model, batch)
    ref = batch_reference(model, batch) if t.objective == "dpo" else None
    losses, m = pair_losses(t, logps, n, ref)
    part = losses.sum() / pairs
    if t.objective == "orpo":
        nll = -logps[0::2].sum() / chosen_tokens
        part = part + nll
        sums["nll"] = sums.get("nll", 0.0) + float(nll.detach())
    for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v.sum())
    return part


def step_metrics(sums: dict[str, float], counts: list[int], dist: Dist | None = None,
                 device: str = "cpu") -> dict[str, float]:
    """Per-pair means of the metric sums (the NLL is already a mean), over all ranks."""
    if dist is not None and dist.active:
        keys = sorted(sums)
        sums = dict(zip(keys, (float(x) for x in all_sum(dist, [sums[k] for k in keys], device))))
    pairs = max(counts[0], 1)
    out = {k: sums[k] / pairs for k in PAIR_METRICS if k in sums}
    if "nll" in sums:
        out["nll"] = sums["nll"]
    out["pairs"] = counts[0]
    return out


@torch.no_grad()
def evaluate_pairs(model, batches, t: TrainConfig, device: str, autocast) -> dict[str, float]:
    """The objective's mean loss and per-pair metrics over preference batches (eval split).

    autocast: a context-manager factory for the run's compute dtype. `perplexity` is that of
    the chosen completions under the adapter (ORPO's NLL term is its log).
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    pair_loss, pairs, chosen_nll, chosen_tokens = 0.0, 0, 0.0, 0
    with autocast():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logps, n = sequence_logprobs(model, batch)
            ref = batch_reference(model, batch) if t.objective == "dpo" else None
            losses, m = pair_losses(t, logps, n, ref)
            pair_loss += float(losses.sum())
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
            chosen_nll -= float(logps[0::2].sum())
            chosen_tokens += int(n[0::2].sum())
            pairs += len(losses)
    model.train(was_training)
    nll = chosen_nll / max(chosen_tokens, 1)
    loss = pair_loss / max(pairs, 1) + (nll if t.objective == "orpo" else 0.0)
    return {"loss": loss, "perplexity": math.exp(min(nll, 50.0)), "pairs": pairs,
            **{k: v / max(pairs, 1) for k, v in sums.items()}}
