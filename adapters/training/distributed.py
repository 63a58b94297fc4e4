"""Data-parallel training under torchrun: the few collectives the loop needs, and who writes.

`torchrun --nproc_per_node N -m adapters train RECIPE` starts N copies of the same loop.
Each rank loads its own base (quantized or not), takes every N-th packed item of the epoch's
shuffled order (Batcher's shard), and per optimiser step:
  1. sums the trainable-token count over ranks, so every rank divides by the global count;
  2. after its backward, sums the adapter gradients (one flat buffer, only the trainable
     LoRA tensors: a few MB) together with the loss.
The result is the gradient of the global batch's mean loss, the same on every rank, so the
optimiser steps (and states) stay identical without broadcasting weights. N ranks with batch b
take the same steps as one rank with batch N*b on the same items. Rank 0 alone writes
checkpoints, metrics and the adapter. We do not use DistributedDataParallel: its per-backward
hooks would all-reduce every micro-batch of grad_accum, where one reduce per step is enough.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ..errors import TrainingError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> Dist:
    """The rank and world size torchrun (or accelerate launch) sets; one process otherwise."""
    env = os.environ
    return Dist(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                int(env.get("LOCAL_RANK", 0)))


def init(timeout_s: int) -> Dist:
    """Join the process group (NCCL on CUDA, gloo on CPU) when launched with several ranks.

    timeout_s bounds every collective: a rank that hangs (not one that dies: its peers see
    the closed connection at once) ends the job after this long instead of never.
    """
    d = from_env()
    if d.active and not tdist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            if d.local_rank >= torch.cuda.device_count():
                raise TrainingError(
                    f"rank {d.rank}: local rank {d.local_rank} but this machine has "
                    f"{torch.cuda.device_count()} GPU(s); start at most one process per GPU "
                    "(or hide the GPUs with CUDA_VISIBLE_DEVICES= to run on CPU with gloo)")
            torch.cuda.set_device(d.local_rank)
        tdist.init_process_group("nccl" if cuda else "gloo",
                                 timeout=dt.timedelta(seconds=timeout_s))
    return d


def device_for(d: Dist, requested: str | None) -> str | None:
    if d.active and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return requested


def collective(d: Dist, fn, what: str):
    """Run the collective `fn`; a dead or unreachable peer becomes a TrainingError that says so."""
    try:
        return fn()
    except (RuntimeError, tdist.DistError) as e:  # gloo/NCCL: peer gone, timeout
        raise TrainingError(f"lost contact with the other ranks during {what} (one of "
                            f"{d.world} failed or was killed; its own message is above): "
                            f"{str(e).splitlines()[0]}") from e


def all_sum(d: Dist, values: list[float], device: str) -> list[float]:
    """Element-wise sum over ranks (float64: token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    collective(d, lambda: tdist.all_reduce(t), "a count")
    return t.tolist()


def gather_objects(d: Dist, obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    out = [None] * d.world
    collective(d, lambda: tdist.all_gather_object(out, obj), "the ranks' checkpoint state")
    return out


def any_rank(d: Dist, flag: bool, device: str) -> bool:
    """True on every rank when it is true on any (e.g. a stop signal one rank caught)."""
    t = torch.tensor([int(flag)], device=device)
    collective(d, lambda: tdist.all_reduce(t, op=tdist.ReduceOp.MAX), "a stop check")
    return bool(t.item())


def sum_grads(d: Dist, params: list[torch.Tensor], loss_sum: float) -> float:
    """Sum every rank's gradients of `params` (in place) and the loss sums; return the latter.

    One flat buffer: [sum(numel)] gradients + 1 loss, so one collective per optimiser step.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]
                     + [torch.tensor([loss_sum], device=grads[0].device)])
    collective(d, lambda: tdist.all_reduce(flat), "the gradient sum")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
    return float(flat[-1])


def broadcast_params(d: Dist, params: list[torch.Tensor]) -> None:
    """Start every rank from rank 0's adapter weights (same seed makes them equal already;
    this makes it true whatever a library's initialisation does)."""
    for p in params:
        collective(d, lambda p=p: tdist.broadcast(p.data, 0), "the initial weights")


def abort(d: Dist) -> None:
    """Leave the group at once on an error: the peers see the closed connection and stop."""
    if d.active and tdist.is_initialized():
        tdist.destroy_process_group()


def finish(d: Dist) -> None:
    if d.active and tdist.is_initialized():
        collective(d, tdist.barrier, "the final barrier")
        tdist.destroy_process_group()
