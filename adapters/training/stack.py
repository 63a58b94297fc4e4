"""Several jobs' micro-batches as one decoder input, and each job's view of the result.

Rows never interact in a decoder (attention stays within a row), so stacking the jobs'
batches along the batch dimension and padding them on the right to one length leaves every
real token's hidden state what it is in the job's own batch: right padding comes after every
real token, and the causal mask keeps it out of their attention. The masks are brought to one
form: when any batch is packed (a (B, 1, T, T) block mask) the others' padding masks become
the same causal-and-padding blocks; a padded position attends to itself alone (no empty row).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def _block_mask(b: dict, T: int) -> torch.Tensor:
    """The batch's (B, 1, T, T) boolean mask, padded to T (True = may attend)."""
    mask = b["attention_mask"]
    B, t = b["input_ids"].shape
    if mask.dim() == 2:  # padding mask: causal among the real tokens
        causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
        mask = (causal[None] & mask.bool()[:, None, :])[:, None]  # (B, 1, t, t)
    out = torch.zeros(B, 1, T, T, dtype=torch.bool, device=mask.device)
    out[:, :, :t, :t] = mask
    idx = torch.arange(t, T, device=mask.device)
    out[:, :, idx, idx] = True  # added padding attends to itself only
    return out


def stack_batches(batches: list[dict], pad_id: int) -> tuple[dict, list[tuple[int, int]]]:
    """(decoder inputs of all batches stacked, each batch's (first row, end row)).

    batches: input_ids (B_j, T_j), attention_mask (B_j, T_j) or (B_j, 1, T_j, T_j),
    position_ids (B_j, T_j) when packed. Returns input_ids, attention_mask and (when any batch
    has them) position_ids for (sum B_j, max T_j).
    """
    T = max(b["input_ids"].shape[1] for b in batches)
    four_d = any(b["attention_mask"].dim() == 4 for b in batches)
    positions = any("position_ids" in b for b in batches)  # else the decoder's own, as alone
    ids, masks, pos, spans, row = [], [], [], [], 0
    for b in batches:
        x = b["input_ids"]
        B, t = x.shape
        ids.append(torch.nn.functional.pad(x, (0, T - t), value=pad_id))
        p = b.get("position_ids")
        if p is None:  # a padded batch: positions count from 0 in every row
            p = torch.arange(t, device=x.device).expand(B, t)
        pos.append(torch.nn.functional.pad(p, (0, T - t), value=0))
        if four_d:
            masks.append(_block_mask(b, T))
        else:
            masks.append(torch.nn.functional.pad(b["attention_mask"], (0, T - t), value=0))
        spans.append((row, row + B))
        row += B
    inputs = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
    if positions:
        inputs["position_ids"] = torch.cat(pos)
    return inputs, spans


class HiddenView:
    """One job's rows of the stacked forward, read by its objective as if it were the model:
    the decoder "returns" the job's hidden states (B_j, T_j, H); the head is the base's. The
    objective's loss code (loss.py, objectives.py) then runs unchanged on them."""

    def __init__(self, base, hidden: torch.Tensor):
        self.base, self.hidden = base, hidden

    def get_base_model(self):
        return self

    def get_decoder(self):
        return lambda **_: SimpleNamespace(last_hidden_state=self.hidden)

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

