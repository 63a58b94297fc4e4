"""The optimiser and the learning-rate schedule of a run (only the adapter's tensors learn)."""

from __future__ import annotations

import math

import torch

from ..config import RunConfig, TrainConfig


def lr_lambda(schedule: str, warmup: int, total: int):
    """The LR multiplier per step: linear warm-up, then constant, linear or cosine to zero."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors of `params` (a model's, or one job's adapter)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            # Biases, norms and DoRA magnitudes (1-D) are not decayed.
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # loads native backends and logs about them: only when chosen

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def make_scheduler(optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule; its `state_dict()` (JSON-safe: the multiplier is a plain function, which
    LambdaLR leaves out) goes into the checkpoint's state.json."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, total))


def total_steps(cfg: RunConfig, batches_per_epoch: int) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    epochs = cfg.train.epochs or 1.0
    return max(1, math.ceil(epochs * batches_per_epoch / cfg.train.grad_accum))
