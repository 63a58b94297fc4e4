"""GRPO's arithmetic: group-normalised advantages and the clipped policy-gradient loss.

Completions are flat: the N counted completion tokens of a micro-batch, `seq` (N,) saying
which of its S completions each belongs to. With `lp` the policy's log-probs (N,), `old` the
sampling policy's (`lp` detached when each batch of rollouts is used once), `ref` the
adapter-off model's and A (S,) the advantages, per token:

  ratio = exp(lp - old);  clipped = clamp(ratio, 1 - epsilon, 1 + epsilon_high)
  loss  = -min(ratio A, clipped A) + beta (exp(ref - lp) - (ref - lp) - 1)

and the micro-batch's share of the step's loss, by loss type (S_step, N_step: the step's
completions and counted tokens over all micro-batches and ranks):

  grpo      sum over completions of (its tokens' loss sum / its token count) / S_step
  bnpo      sum of token losses / N_step       dapo: the same (TRL normalises by the
                                                generation batch's tokens)
  dr_grpo   sum of token losses / (S_step x max_completion_length)

For one micro-batch on one rank these are TRL GRPOTrainer's `_compute_loss` numbers
(tests/test_grpo.py feeds both the same tensors); with accumulation or ranks the step's totals
divide, so the step equals one big batch, as for every objective here.
"""

from __future__ import annotations

import torch

from ..config import GrpoConfig


def advantages(rewards: torch.Tensor, weights: torch.Tensor, group: int,
               scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (S,), total rewards (S,)) from per-reward values (S, R), groups of `group`.

    As TRL: the weighted sum, minus its group's mean, divided by the group's (or the batch's)
    standard deviation (Bessel-corrected) + 1e-4 unless `scale` is "none".
    """
    total = (rewards * weights[None, :]).sum(1)  # (S,)
    grouped = total.view(-1, group)  # (S / group, group)
    mean = grouped.mean(1).repeat_interleave(group)
    if scale == "batch":
        std = total.std().expand_as(total) if total.numel() > 1 else torch.zeros_like(total)
    else:
        std = grouped.std(1).repeat_interleave(group)
    adv = total - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv, total


def token_terms(g: GrpoConfig, lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None,
                adv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token loss and the metrics' per-token parts; adv: each token's advantage (N,)."""
    ratio = torch.exp(lp - old)
    high = g.epsilon if g.epsilon_high is None else g.epsilon_high
    clipped = torch.clamp(ratio, 1 - g.epsilon, 1 + high)
    loss = -torch.min(ratio * adv, clipped * adv)
    out = {"clipped": ((ratio < 1 - g.epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))}
    if g.beta != 0.0 and ref is not None:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        loss = loss + g.beta * kl
        out["kl"] = kl.detach()
    out["loss"] = loss
    return out


def reduce(g: GrpoConfig, token_loss: torch.Tensor, seq: torch.Tensor, n_seq: int,
           step_seqs: int, step_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the step's loss from its per-token losses (N,)."""
    if g.loss_type == "grpo":
        counts = torch.bincount(seq, minlength=n_seq).clamp(min=1).to(token_loss.dtype)
        per_seq = torch.zeros(n_seq, dtype=token_loss.dtype, device=token_loss.device)
        per_seq = per_seq.index_add(0, seq, token_loss) / counts  # (S,)
        return per_seq.sum() / max(step_seqs, 1)
    if g.loss_type == "dr_grpo":
        return token_loss.sum() / (max(step_seqs, 1) * g.max_completion_length)
    return token_loss.sum() / max(step_tokens, 1)  # bnpo, dapo
