"""Preference accuracy on `preference` data: is the chosen answer scored above the rejected?

- preference_accuracy (every model, the base too): the model's own sequence log-probability
  of the chosen completion is higher than that of the rejected one.
- reward_accuracy: DPO's implicit reward, the log-prob gain over the base (the same model
  with the adapter switched off), is higher for chosen than for rejected; the sign does not
  depend on beta. The base gains nothing over itself: 0.5, chance.
A tie counts half in both.
Log-probs come from `training.objectives.sequence_logprobs`, the one used in training.
"""

from __future__ import annotations

import torch

from ..training.loss import autocast_for
from ..training.objectives import sequence_logprobs


def _wins(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Pairs won, a tie counting half (so a model that cannot tell them apart scores 0.5)."""
    return float((chosen > rejected).sum()) + 0.5 * float((chosen == rejected).sum())


@torch.no_grad()
def preference_scores(model, batches, device: str, dtype: torch.dtype, adapter: bool,
                      base_logps: list[torch.Tensor] | None = None
                      ) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Preference and reward accuracy over batches of preference pairs, and this model's
    sequence log-probs per batch.

    adapter: the model is a PeftModel with an adapter active; for the base row (False) the
    reward (a gain over itself) is 0 for both sides: reward accuracy 0.5, chance.
    base_logps: the base row's log-probs of the same batches (what this returned for it), so
    the base runs once per dataset, not once per adapter; None: computed here with the
    adapter switched off.
    """
    right = reward_right = 0.0
    pairs = 0
    mine = []
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(device, dtype):
            lp = sequence_logprobs(model, batch)[0]  # (2P,) chosen, rejected, ...
            gain = torch.zeros_like(lp)
            if adapter and base_logps is not None:
                gain = lp - base_logps[i]
            elif adapter:
                with model.disable_adapter():
                    gain = lp - sequence_logprobs(model, batch)[0]
        mine.append(lp)
        right += _wins(lp[0::2], lp[1::2])
        reward_right += _wins(gain[0::2], gain[1::2])
        pairs += len(lp) // 2
    return ({"preference_accuracy": right / max(pairs, 1),
             "reward_accuracy": reward_right / max(pairs, 1)}, mine)
