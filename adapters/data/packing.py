"""Batches: padding-free packing (block-diagonal attention) or padding to the batch's longest.

Packing puts several examples in one row of at most `max_len` tokens. Position ids restart
at 0 for each example and a boolean block-diagonal causal mask `(B, 1, T, T)` keeps examples
from attending to each other: with SDPA this gives each example exactly its solo logits.
Restarting position ids alone does not: without the mask, under SDPA or eager attention, a
packed example's logits differ from its solo ones (tests/test_data.py checks the isolation).
"""

from __future__ import annotations

import bisect
import random

import torch

from ..config import IGNORE_INDEX
from .preference import pair_groups


def pack_bins(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: group example indices into rows of total length <= max_len.

    Deterministic for the same lengths; O(n log n) via a sorted list of free capacities.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (capacity left, bin id), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, b = free.pop(k)
            bins[b].append(i)
            if cap - n > 0:
                bisect.insort(free, (cap - n, b))
        else:
            bins.append([i])
            if max_len - n > 0:
                bisect.insort(free, (max_len - n, len(bins) - 1))
    for b in bins:
        b.sort()  # keep source order inside a row
    return bins


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of one epoch: a function of (seed, epoch) only, for resume."""
    order = list(range(n_items))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def collate_packed(rows: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict:
    """rows: per batch row, its examples as (ids, labels). Returns model inputs + labels."""
    if all(len(row) == 1 for row in rows):
        # One example per row (e.g. long text windows): a padding mask is enough, and lets
        # SDPA take its causal fast path instead of an explicit (B, 1, T, T) mask.
        return collate_padded([row[0] for row in rows], pad_id)
    T = max(sum(len(ids) for ids, _ in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)  # example index within the row; -1 = pad
    for b, row in enumerate(rows):
        t = 0
        for d, (ids, lab) in enumerate(row):
            n = len(ids)
            input_ids[b, t:t + n] = torch.tensor(ids)
            labels[b, t:t + n] = torch.tensor(lab)
            position_ids[b, t:t + n] = torch.arange(n)
            doc[b, t:t + n] = d
            t += n
        doc[b, t:] = torch.arange(len(row), len(row) + T - t)  # each pad token alone
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    same = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    mask = (same & causal)[:, None]  # (B, 1, T, T): True = may attend
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": mask, "n_tokens": (doc < torch.tensor(
                [len(r) for r in rows])[:, None]).sum()}


def collate_padded(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-pad to the longest example of this batch (not to max_seq_len)."""
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, lab) in enumerate(examples):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(ids)] = torch.tensor(lab)
        attn[b, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attn,
            "n_tokens": attn.sum()}


def collate_pairs(items: list[list[tuple[list[int], list[int]]]], pad_id: int,
                  packing: bool) -> dict:
    """Preference batches: each item is pairs' examples (chosen, rejected, chosen, ...).

    Packed, an item is one row (a pair longer than max_len alone in its row); padded, every
    example is a row. Adds `seq` (B, T): the example's index in the batch (-1 on padding), so
    sequence 2k is pair k's chosen and 2k + 1 its rejected.
    """
    rows = items if packing else [[ex] for item in items for ex in item]
    out = collate_packed(rows, pad_id)
    seq = torch.full(out["input_ids"].shape, -1, dtype=torch.long)
    k = 0
    for b, row in enumerate(rows):
        t = 0
        for ids, _ in row:
            seq[b, t:t + len(ids)] = k
            t, k = t + len(ids), k + 1
    out["seq"] = seq
    return out


class Batcher:
    """Deterministic, resumable batches over a tokenised split.

    Items are packed rows (lists of example indices) or single examples. The order of an
    epoch depends only on (seed, epoch), so a run resumed at (epoch, position) sees exactly
    the batches the uninterrupted run would have seen.
    """

    def __init__(self, dataset, batch_size: int, max_len: int, packing: bool, pad_id: int,
                 seed: int = 0, shard: tuple[int, int] = (0, 1)):
        self.ids = dataset["input_ids"]
        self.labels = dataset["labels"]
        self.batch_size, self.packing, self.pad_id, self.seed = batch_size, packing, pad_id, seed
        self.shard = shard  # (rank, world size)
        lengths = [len(x) for x in self.ids]
        self.items = pack_bins(lengths, max_len) if packing else [[i] for i in range(len(lengths))]
        self.paired = "pair" in getattr(dataset, "column_names", ())
        # Per-example values, collated (N,) in the examples' order (row-major; for pairs that
        # of `seq`): format label's class id or value (`target`), DPO's cached reference
        # log-prob of each sequence (`ref_logps`, training/reference.py).
        self.values = {c: dataset[c] for c in ("target", "ref_logps")
                       if c in getattr(dataset, "column_names", ())}
        if self.paired:  # preference data: a pair's chosen and rejected stay in one batch
            groups = pair_groups(dataset["pair"])
            bins = pack_bins([sum(lengths[i] for i in g) for g in groups], max_len)
            self.items = ([[i for b in row for i in groups[b]] for row in bins] if packing
                          else groups)
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, this rank's items): one shuffle

    def _mine(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            rank, world = self.shard
            self._order = (epoch, epoch_order(len(self.items), self.seed, epoch)[rank::world])
        return self._order[1]

    def batches_per_epoch(self) -> int:
        per_rank = len(self.items) // self.shard[1]
        return max(1, per_rank // self.batch_size)

    def _collate(self, chosen: list[list[int]]) -> dict:
        out = self._collate_ids(chosen)
        for name, values in self.values.items():
            out[name] = torch.tensor([values[i] for item in chosen for i in item],
                                     dtype=torch.float32)
        return out

    def _collate_ids(self, chosen: list[list[int]]) -> dict:
        if self.paired:
            return collate_pairs([[(self.ids[i], self.labels[i]) for i in item]
                                  for item in chosen], self.pad_id, self.packing)
        if self.packing:
            rows = [[(self.ids[i], self.labels[i]) for i in item] for item in chosen]
            return collate_packed(rows, self.pad_id)
        return collate_padded([(self.ids[i[0]], self.labels[i[0]]) for i in chosen], self.pad_id)

    def iter_all(self):
        """Every item once, in a fixed order (for evaluation)."""
        for s in range(0, len(self.items), self.batch_size):
            yield self._collate(self.items[s:s + self.batch_size])

    def batch(self, epoch: int, index: int) -> dict:
        """Batch `index` of `epoch` for this rank (ranks take interleaved items)."""
        mine = self._mine(epoch)
        if len(mine) < self.batch_size:  # tiny data: repeat to fill one batch
            mine = (mine * (self.batch_size // max(len(mine), 1) + 1))
        start = index * self.batch_size
        return self._collate([self.items[i] for i in mine[start:start + self.batch_size]])
