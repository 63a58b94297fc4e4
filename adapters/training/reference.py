"""DPO's reference log-probs, computed once per run instead of once per step.

With `train.dpo_reference: cached` every training pair's reference sequence log-probs (the
base: the adapter switched off, no graph) are computed before the first step, in batches, and
become the split's `ref_logps` column; the Batcher hands each batch its sequences' values
(`ref_logps` (S,), in `seq` order) and the step uses them instead of a second forward
(objectives.preference_loss). The eval split's are computed the same way in both modes: once
per run, not at every evaluation.

They are kept in `reference_logps.safetensors` in the output folder: one fp32 tensor (N,) per
split, indexed by example, with a fingerprint of what they depend on (base, dtype, token ids,
labels). A resumed run reads them back, the very numbers the interrupted run used; a fresh run
computes them anew (the base behind a name may have changed). Under DDP each rank computes
every world-th pair and an all-reduce gives every rank all of them; under FSDP every rank runs
every forward, since each forward gathers the sharded base from all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data import DataBundle
from ..data.packing import Batcher
from ..data.preference import pair_groups
from ..io import atomic_write_bytes
from . import objectives
from .distributed import Dist, all_sum
from .loss import autocast_for

log = logging.getLogger(__name__)

FILE = "reference_logps.safetensors"
COLUMN = "ref_logps"


def fingerprint(ds, cfg: RunConfig, dtype: torch.dtype) -> str:
    """What a split's reference log-probs depend on: the base, its precision, the tokens."""
    h = hashlib.sha256(repr((cfg.model.name, cfg.model.quantization, cfg.model.quant_type,
                             str(dtype))).encode())
    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
        h.update(b"|")  # example boundary: [1, 2] [3] and [1] [2, 3] hash apart
    return h.hexdigest()


def split_logprobs(model, ds, cfg: RunConfig, dist: Dist, device: str, dtype: torch.dtype,
                   pad_id: int, progress: bool = False, desc: str = "reference") -> torch.Tensor:
    """Reference sequence log-probs (N,) fp32 of every example of a preference split."""
    groups = pair_groups(ds["pair"])  # [[chosen, rejected], ...] example indices
    split = dist.active and cfg.train.parallel != "fsdp"
    mine = groups[dist.rank::dist.world] if split else groups
    index = [i for g in mine for i in g]
    sub = Batcher(ds.select(index), cfg.train.batch_size, cfg.data.max_seq_len,
                  cfg.data.packing, pad_id)
    # iter_all numbers a batch's sequences in item order: this is the order of its results
    order = torch.tensor([index[i] for item in sub.items for i in item], dtype=torch.long)
    parts = []
    with tqdm(total=len(mine), disable=not progress, unit="pair", desc=desc) as bar:
        for batch in sub.iter_all():
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast_for(device, dtype):
                parts.append(objectives.reference_logprobs(model, batch).float().cpu())  # (S,)
            bar.update(len(parts[-1]) // 2)
    out = torch.zeros(len(ds), dtype=torch.float64)
    if index:
        out[order] = torch.cat(parts).double()
    if split:  # each rank filled its own pairs, zeros elsewhere: the sum is all of them
        out = torch.tensor(all_sum(dist, out.tolist(), device), dtype=torch.float64)
    return out.float()


def _stored(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and fingerprints of an earlier reference file ({}, {} when there is none)."""
    if not path.is_file():
        return {}, {}
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (OSError, SafetensorError) as e:
        log.warning("%s: unreadable (%s); computing the reference log-probs again", path, e)
        return {}, {}


def cache(model, data: DataBundle, cfg: RunConfig, dist: Dist, device: str,
          dtype: torch.dtype, pad_id: int, resume: bool = False,
          progress: bool = False) -> DataBundle:
    """The splits with their `ref_logps` column: the train split's when dpo_reference is
    cached, the eval split's always; read back from the output folder on resume."""
    if "pair" not in data.train.dataset.column_names:
        return data  # not preference data: the first step says what to set
    path = Path(cfg.output.dir) / FILE
    stored, meta = _stored(path) if resume else ({}, {})
    wanted = {"train": data.train if cfg.train.dpo_reference == "cached" else None,
              "eval": data.eval}
    tensors, prints, out, computed = {}, {}, {}, False
    for name, split in wanted.items():
        if split is None:
            continue
        ds = split.dataset
        if COLUMN in ds.column_names:  # computed before in this process (a second call)
            ds = ds.remove_columns(COLUMN)
        key = fingerprint(ds, cfg, dtype)
        if name in stored and meta.get(name) == key and len(stored[name]) == len(ds):
            ref = stored[name]
            log.info("%s: reusing the %s split's reference log-probs", path, name)
        else:
            if resume:
                log.info("%s: no reference log-probs for the %s split as it is now: "
                         "computing them", path, name)
            t0, computed = time.perf_counter(), True
            ref = split_logprobs(model, ds, cfg, dist, device, dtype, pad_id,
                                 progress and dist.main, f"reference log-probs ({name})")
            log.info("reference log-probs of the %s split: %d pairs in %.1f s", name,
                     len(ds) // 2, time.perf_counter() - t0)
        tensors[name], prints[name] = ref.contiguous(), key
        out[name] = dataclasses.replace(split, dataset=ds.add_column(COLUMN, ref.tolist()))
    if dist.main and computed:
        atomic_write_bytes(path, save(tensors, metadata=prints))
    return dataclasses.replace(data, **out)
