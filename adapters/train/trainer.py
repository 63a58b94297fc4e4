"""The training loop: only the adapter weights learn, read top to bottom.

train(cfg) -> output folder with the final adapter (peft-loadable) at its top,
recipe.resolved.yaml, metrics.jsonl, loss.png and checkpoints/step-NNNNNN/.

Per optimiser step: `grad_accum` micro-batches, each through the decoder under autocast, the
loss fused with the lm_head at label positions only, normalised by the step's total count of
trainable tokens (so accumulation equals one big batch); then clip, a non-finite guard, the
(fused) AdamW step and the schedule.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import build_manifest, save_adapter
from ..config import IGNORE_INDEX, RunConfig, dump_recipe, from_dict
from ..data import build as build_data
from ..data.packing import Batcher
from ..errors import TrainingError
from ..io import atomic_write_text, sha256_file
from ..lora import attach_lora, set_adapter_training, trainable_report
from ..model import load_base, resolve_dtype
from . import checkpoint as ckpt
from . import distributed
from .distributed import Dist
from .loss import autocast_for, batch_loss, mean_loss
from .runtime import StopSignals, check_disk, check_output_dir, estimate_memory, seed_all

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: RunConfig
    model: object
    tokenizer: object
    batcher: Batcher
    eval_batcher: Batcher | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: str
    dtype: torch.dtype
    out: Path
    total_steps: int
    data_stats: dict
    step: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    bad_in_a_row: int = 0
    bad_total: int = 0
    scaler: torch.amp.GradScaler | None = None  # fp16 only: bf16 and fp32 need no scaling
    dist: Dist = field(default_factory=Dist)  # rank and world size under torchrun
    last: dict = field(default_factory=dict)


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # Biases, norms and DoRA magnitudes (1-D) are not decayed.
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def total_steps(cfg: RunConfig, batches_per_epoch: int) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    epochs = cfg.train.epochs or 1.0
    return max(1, math.ceil(epochs * batches_per_epoch / cfg.train.grad_accum))


def setup(cfg: RunConfig, device: str | None = None) -> Run:
    out = Path(cfg.output.dir)
    check_output_dir(out)
    seed_all(cfg.train.seed)
    d = distributed.init(cfg.train.dist_timeout_s)
    device = distributed.device_for(d, device)
    model, tok = load_base(cfg.model, device)
    device = str(model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = attach_lora(model, cfg.lora)
    if cfg.train.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if dtype != torch.float32:
        # Under autocast the matmuls run in bf16 anyway: peft's cast of every LoRA input to
        # the fp32 adapter dtype would only add a copy per layer (~8% of a step on CPU).
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    if cfg.train.compile:
        # Compile the decoder's forward in place: module names (and so the adapter's state
        # dict) stay as they are. Compilation happens in the first step; the loop reports it.
        decoder = model.get_base_model().get_decoder()
        decoder.forward = torch.compile(decoder.forward, dynamic=True)
    set_adapter_training(model, True)
    if d.active:
        distributed.broadcast_params(d, [p for p in model.parameters() if p.requires_grad])
    data = build_data(cfg.data, tok, seed=cfg.train.seed)
    mk = lambda ds, seed, shard=(0, 1): Batcher(  # noqa: E731
        ds, cfg.train.batch_size, cfg.data.max_seq_len, cfg.data.packing, tok.pad_token_id,
        seed, shard)
    batcher = mk(data.train.dataset, cfg.train.seed, (d.rank, d.world))
    eval_batcher = mk(data.eval.dataset, 0) if data.eval else None
    steps = total_steps(cfg, batcher.batches_per_epoch())
    opt = make_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, steps))
    stats = {"format": cfg.data.format, "files": data_files(cfg.data), "train": data.train.stats,
             "eval": data.eval.stats if data.eval else None}
    scaler = torch.amp.GradScaler(device.split(":")[0]) if dtype == torch.float16 else None
    return Run(cfg, model, tok, batcher, eval_batcher, opt, sched, device, dtype, out, steps,
               stats, scaler=scaler, dist=d)


def micro_batches(run: Run, step: int) -> list[dict]:
    ga, bpe = run.cfg.train.grad_accum, run.batcher.batches_per_epoch()
    return [run.batcher.batch(*divmod(step * ga + i, bpe)) for i in range(ga)]


def train_step(run: Run, step: int) -> dict:
    """One optimiser step; returns its metrics. Non-finite steps are skipped, not applied."""
    t0 = time.perf_counter()
    micro = micro_batches(run, step)
    counted = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    tokens = sum(int(b["n_tokens"]) for b in micro)
    if run.dist.active:  # divide by the global batch's count: ranks then sum to the mean
        counted, tokens = map(int, distributed.all_sum(run.dist, [counted, tokens], run.device))
    loss_sum = 0.0
    for b in micro:
        b = {k: v.to(run.device) for k, v in b.items()}
        with autocast_for(run.device, run.dtype):
            s, _ = batch_loss(run.model, b)
        part = s / max(counted, 1)
        (run.scaler.scale(part) if run.scaler else part).backward()
        loss_sum += float(s.detach())
    max_norm = run.cfg.train.max_grad_norm or float("inf")
    params = [p for g in run.optimizer.param_groups for p in g["params"]]  # the adapter's
    if run.dist.active:
        loss_sum = distributed.sum_grads(run.dist, params, loss_sum)
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    loss = loss_sum / max(counted, 1)
    if run.scaler:
        # fp16: an overflowing gradient is the scaler's business (it skips and backs off);
        # only a non-finite loss counts as a bad step.
        finite = math.isfinite(loss)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    dt = time.perf_counter() - t0
    return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
            "trainable_tokens": counted, "tokens_per_s": tokens / dt, "seconds": dt,
            "finite": finite}


def evaluate(run: Run) -> dict | None:
    if run.eval_batcher is None or not run.dist.main:  # rank 0 evaluates, the others go on
        return None
    return mean_loss(run.model, run.eval_batcher.iter_all(), run.device, run.dtype)


def data_files(dcfg) -> list[dict]:
    """Each data file with its size and sha256, for the manifest and the model card."""
    from ..data.sources import expand

    return [{"split": split, "path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for split, spec in (("train", dcfg.train), ("eval", dcfg.eval)) if spec
            for f in expand(spec)]


def manifest_for(run: Run, training: dict | None = None) -> dict:
    base = run.model.get_base_model()
    extra = {"training": training} if training else {}
    return build_manifest(base, run.tokenizer, run.cfg.model.name, run.cfg.model, run.cfg.lora,
                          {"data": run.data_stats, "recipe": run.cfg.to_dict(), **extra})


def save(run: Run, final: bool = False, training: dict | None = None) -> Path:
    """A checkpoint (resumable) and, when final, the adapter at the output folder's top.

    Under torchrun only rank 0 writes: every rank holds the same weights and optimiser state.
    """
    if not run.dist.main:
        return run.out / "checkpoints"
    man = manifest_for(run, training)
    state = {"step": run.step, "tokens": run.tokens, "trainable_tokens": run.trainable_tokens,
             "bad_in_a_row": run.bad_in_a_row, "bad_total": run.bad_total,
             "scaler": run.scaler.state_dict() if run.scaler else None,
             "recipe": run.cfg.to_dict(), "world_size": run.dist.world}
    path = ckpt.save_checkpoint(run.out / "checkpoints", run.step,
                                lambda d: save_adapter(run.model, d, man), run.optimizer, state,
                                run.cfg.train.keep_checkpoints)
    if final:
        save_adapter(run.model, run.out, man)
    return path


def restore(run: Run, resume: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = ckpt.find_resume(run.out, resume)
    state = ckpt.load_state(path)
    matter, harmless = ckpt.recipe_changes(state["recipe"], run.cfg)
    if matter:
        raise TrainingError(f"{path}: cannot resume, the recipe changed in ways that alter the "
                            "run:\n  " + "\n  ".join(matter))
    world = state.get("world_size", 1)
    if world != run.dist.world:
        raise TrainingError(
            f"{path}: written by a run on {world} rank(s), this one has {run.dist.world}: the "
            f"data shards and the global batch would differ. Resume with --nproc {world} "
            f"(torchrun --nproc_per_node {world})")
    for line in harmless:
        log.info("resume: allowed change %s", line)
    set_peft_model_state_dict(run.model, load_file(path / "adapter_model.safetensors"))
    ckpt.load_optimizer(path, run.optimizer)
    for key in ("step", "tokens", "trainable_tokens", "bad_in_a_row", "bad_total"):
        setattr(run, key, state[key])
    if run.scaler and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.scheduler.last_epoch = run.step
    run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    ckpt.set_rng_state(state["rng"])
    if run.dist.main:
        _truncate_metrics(run.out / "metrics.jsonl", run.step)
    log.info("resumed from %s at step %d", path, run.step)


def _truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines()
                 if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def preflight(run: Run) -> dict:
    rep = trainable_report(run.model)
    t = run.cfg.train
    est = estimate_memory(run.model, t.batch_size, run.cfg.data.max_seq_len,
                          run.tokenizer.vocab_size if hasattr(run.tokenizer, "vocab_size") else 0)
    info = {"trainable_params": rep["trainable"], "total_params": rep["total"],
            "trainable_percent": rep["percent"], "steps": run.total_steps,
            "tokens_per_step_max": t.batch_size * t.grad_accum * run.cfg.data.max_seq_len,
            "estimated_peak_bytes": est["total"], "free_memory_bytes": est["free"],
            "train_examples": run.data_stats["train"]["examples"],
            "checkpoint_bytes": rep["trainable"] * 4 * 3 + (1 << 20)}  # weights + 2 moments
    log.info("pre-flight: %s", json.dumps(info))
    if est["free"] and est["total"] > est["free"]:
        log.warning("estimated peak memory %.1f GB exceeds the free %.1f GB: lower "
                    "train.batch_size or data.max_seq_len, or enable gradient_checkpointing",
                    est["total"] / 1e9, est["free"] / 1e9)
    return info


def train(cfg: RunConfig, resume: str | None = None, progress: bool = False,
          device: str | None = None, stop_after: int | None = None) -> Path:
    """Train an adapter as the recipe says; returns the output folder.

    resume: "latest" or a checkpoint folder. stop_after: pause (checkpoint, no final adapter)
    after this many steps of this run, e.g. to fit a time slot; --resume continues.
    """
    from .loop import run_loop

    if isinstance(cfg, dict):
        cfg = from_dict(cfg)
    out = Path(cfg.output.dir)
    check_output_dir(out)
    main = distributed.from_env().main
    if not resume:
        earlier = ckpt.list_checkpoints(out / "checkpoints")
        if earlier:
            raise TrainingError(f"{out}: holds checkpoints of an earlier run (newest "
                                f"{earlier[-1].name}); continue it with --resume, or choose "
                                "another output.dir")
        if main:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    if not main:  # rank 0 speaks for all; the others only warn
        logging.getLogger("adapters").setLevel(logging.WARNING)
    run = setup(cfg, device)
    try:
        if resume:
            restore(run, resume)
        if run.dist.main:
            atomic_write_text(run.out / "recipe.resolved.yaml", dump_recipe(cfg))
            info = preflight(run)
            check_disk(run.out, info["checkpoint_bytes"] * (cfg.train.keep_checkpoints + 2))
        with StopSignals() as signals:
            run_loop(run, signals, progress and run.dist.main, stop_after)
        distributed.finish(run.dist)
    except BaseException:
        distributed.abort(run.dist)
        raise
    return run.out
