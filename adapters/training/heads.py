"""The task-head objective: cross-entropy (classification) or MSE (regression) per example.

A batch of `label` data marks each example's last real token (its only label that is not
IGNORE_INDEX, data/labels.py) and carries `target` (N,): the class ids or values of its N
examples in row-major order, the order of the marks. The decoder runs to its last hidden
state, exactly as for the LM loss (packed rows keep their block-diagonal mask), the head is
applied at the marked positions only: (N, H) -> (N, num_labels).

The step's loss is the mean over its examples, across micro-batches and ranks, so
accumulation equals one big batch: each micro-batch returns its sum, the loop divides by the
step's example count (`counted`).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ..config import IGNORE_INDEX, RunConfig
from ..data.labels import Targets, read_targets
from ..errors import ConfigError
from ..heads import head_module, load_head_model, task_section
from ..model import load_base
from .loss import autocast_for
from .loss import batch_loss as lm_batch_loss
from .loss import mean_loss as lm_mean_loss

log = logging.getLogger(__name__)


def targets_for(cfg: RunConfig) -> Targets | None:
    """The run's targets (class names from data.train for classification); None for an LM.

    Checked before the model loads: the task and the data format go together.
    """
    task, fmt = cfg.model.task, cfg.data.format
    if task == "causal_lm":
        if fmt == "label":
            raise ConfigError("data.format: label trains a task head: set model.task: "
                              "classification or regression")
        return None
    problems = []
    if fmt != "label":
        problems.append(f"model.task: {task} trains on data.format: label (a text and a label "
                        f"column), got data.format: {fmt}")
    if cfg.train.objective != "sft":
        problems.append(f"train.objective: {cfg.train.objective} is for causal LMs; a task "
                        "head trains with cross-entropy / MSE (leave train.objective: sft)")
    if task == "regression" and cfg.model.num_labels not in (None, 1):
        problems.append("model.num_labels: regression has one output; drop model.num_labels")
    if problems:
        raise ConfigError("recipe: " + "; ".join(problems))
    targets = read_targets(cfg)
    if targets.names:
        log.info("classification: %d labels %s", len(targets.names), targets.names[:20])
    return targets


def load_head(cfg: RunConfig, device: str | None, targets: Targets):
    """(model, tokenizer): the base with a new head (its initial weights from train.seed)."""
    return load_head_model(cfg.model, targets.names, device, seed=cfg.train.seed)


def load_model(cfg: RunConfig, device: str | None, targets: Targets | None):
    """(model, tokenizer) a run trains: the base, or the base with a new task head."""
    return load_head(cfg, device, targets) if targets else load_base(cfg.model, device)


def pooled_logits(model, batch: dict) -> torch.Tensor:
    """(N, num_labels) head outputs at the N marked positions (row-major order)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    h = hidden[batch["labels"] != IGNORE_INDEX]  # (N, H): each example's last real token
    _, head = head_module(model)  # peft's wrapper: the adapter's copy, or the original head
    return head(h)


def example_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy (several outputs) or squared error (one output), in fp32."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        return (logits[:, 0] - target.float()) ** 2
    return F.cross_entropy(logits, target.long(), reduction="none")


def counted(batch: dict) -> int:
    """What a step's loss is averaged over: the examples of a task-head batch, the trainable
    next-token positions of an LM batch."""
    if "target" in batch:
        return int(batch["target"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def batch_loss(model, batch: dict) -> torch.Tensor:
    """Sum of this batch's losses (differentiable): per example for a head, else per token."""
    if "target" not in batch:
        return lm_batch_loss(model, batch)[0]
    return example_losses(pooled_logits(model, batch), batch["target"]).sum()


@torch.no_grad()
def predictions(model, batches, device: str, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, K) fp32, targets (N,)) over batches of label data, in batch order."""
    was_training = model.training
    model.eval()
    outs, ys = [], []
    with autocast_for(device, dtype):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            outs.append(pooled_logits(model, batch).float().cpu())
            ys.append(batch["target"].cpu())
    model.train(was_training)
    return torch.cat(outs), torch.cat(ys)


def mean_loss(model, batches, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Mean loss on the eval split: per example with accuracy (classification) or MAE
    (regression) for a model with a head; per token with perplexity for a causal LM."""
    if head_module(model) is None:
        return lm_mean_loss(model, batches, device, dtype)
    logits, y = predictions(model, batches, device, dtype)
    loss = float(example_losses(logits, y).mean())
    out = {"loss": loss, "examples": len(y)}
    if logits.shape[-1] == 1:
        out["mae"] = float((logits[:, 0] - y).abs().mean())
    else:
        out["accuracy"] = float((logits.argmax(-1) == y.long()).float().mean())
        out["perplexity"] = math.exp(min(loss, 50.0))
    return out


def with_task(manifest, model):
    """The manifest with its `task` section, for a model with a head (else unchanged).

    The head is left out of the base fingerprint: a freshly loaded base initialises a new
    head every time, so its values say nothing about which base this is.
    """
    task = task_section(model)
    if task is None:
        return manifest
    fp = manifest.base.fingerprint
    if fp is not None:
        fp.probe = {k: v for k, v in fp.probe.items() if k.split(".")[0] != task.head}
    manifest.task = task
    return manifest
