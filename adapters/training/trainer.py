"""The training loop, read top to bottom: train -> setup -> fit -> step -> evaluate -> save,
restore. Only the adapter weights learn.

train(cfg) -> output folder with the final adapter (peft-loadable) at its top,
recipe.resolved.yaml, metrics.jsonl, loss.png and checkpoints/step-NNNNNN/.

Per optimiser step: `grad_accum` micro-batches, each through the decoder under autocast, the
loss fused with the lm_head at label positions only, normalised by the step's total count of
trainable tokens (so accumulation equals one big batch); then clip, a non-finite guard, the
(fused) AdamW step and the schedule. `step` is the one place the step counter advances.

Below this story, each module one concern: optim, loss (the fused loss), progress (pre-flight,
metrics, bar, summary), checkpoint, distributed (torchrun), runtime (seeds, signals, memory,
folder checks), plots, objective (the objective chosen once). jobs.py runs several of these
runs on one base in one pass.
"""

from __future__ import annotations

import enum
import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from ..adapter import (
    WEIGHTS_FILE,
    Manifest,
    build_manifest,
    new_manifest,
    save_adapter,
    start_from,
)
from ..config import RunConfig, dump_recipe, from_dict
from ..data import data_files
from ..data.packing import Batcher
from ..errors import TrainingError
from ..io import atomic_write_text
from ..lora import attach_lora, check_rank, set_adapter_training
from ..model import exact_4bit_on_cpu, resolve_dtype
from . import checkpoint as ckpt
from . import distributed, fsdp, fsdp_load, heads
from .accelerate import accelerate
from .distributed import Dist
from .loss import autocast_for
from .objective import Supervised
from .objective import for_config as objective_for
from .optim import make_optimizer, make_scheduler, total_steps
from .plots import plot_losses
from .progress import Progress, eval_line, preflight, truncate_metrics
from .runtime import (
    Interrupted,
    StopSignals,
    check_disk,
    check_output_dir,
    give_back_host_memory,
    keep_freed_host_memory,
    prepare_output,
    seed_all,
)

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How `fit` ended (a stop signal raises `Interrupted` instead)."""

    FINISHED = "finished"  # every step done; the final adapter is at the output folder's top
    PAUSED = "paused"  # stop_after steps done; a checkpoint is written, --resume goes on


@dataclass
class Run:
    """Everything one run holds; `step` (optimiser steps done) advances only in `step()`."""

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
    objective: Supervised = field(default_factory=Supervised)  # chosen once, in setup()
    speed: dict = field(default_factory=dict)  # what accelerate() applied (compile, fused, ...)
    fsdp: dict | None = None  # under fsdp: the base's fingerprint, the per-rank weight bytes
    adapter: str = "default"  # its peft adapter name (one of several in training/jobs.py)


def train(cfg: RunConfig, resume: str | None = None, progress: bool = False,
          device: str | None = None, stop_after: int | None = None) -> Path:
    """Train an adapter as the recipe says; returns the output folder.

    resume: "latest" or a checkpoint folder. stop_after: pause (checkpoint, no final adapter)
    after this many steps of this run, e.g. to fit a time slot; --resume continues.
    """
    if isinstance(cfg, dict):
        cfg = from_dict(cfg)
    main = distributed.from_env().main
    prepare_output(Path(cfg.output.dir), fresh=not resume, main=main)
    if not main:  # rank 0 speaks for all; the others only warn
        logging.getLogger("adapters").setLevel(logging.WARNING)
    # A checkpoint that cannot be continued is refused before the model loads.
    found = ckpt.resumable(cfg, resume, distributed.from_env().world) if resume else None
    run = setup(cfg, device, resume=bool(found), progress=progress)
    kept = keep_freed_host_memory()  # every step reuses the last one's pages (runtime.py)
    try:
        if found:
            restore(run, *found)
        if run.dist.main:
            atomic_write_text(run.out / "recipe.resolved.yaml", dump_recipe(cfg))
            info = preflight(run)
            check_disk(run.out, info["checkpoint_bytes"] * (cfg.train.keep_checkpoints + 2))
        with StopSignals() as signals:
            fit(run, signals, progress and run.dist.main, stop_after)
        distributed.finish(run.dist)
    except BaseException:
        distributed.abort(run.dist)
        give_back_host_memory(kept)
        raise
    out = run.out
    del run  # its tensors go before the heap is trimmed
    give_back_host_memory(kept)
    return out


def setup(cfg: RunConfig, device: str | None = None, resume: bool = False,
          progress: bool = False) -> Run:
    """Base + LoRA, data, batches, optimiser and schedule: a run at step 0.

    resume: a checkpoint will be restored (DPO's cached reference log-probs are read back).
    """
    check_output_dir(Path(cfg.output.dir))  # fail before loading anything
    seed_all(cfg.train.seed)
    objective = objective_for(cfg)  # its settings (e.g. GRPO's rewards) fail before a load
    d = distributed.init(cfg.train.dist_timeout_s)
    device = distributed.device_for(d, device)
    targets = heads.targets_for(cfg)  # model.task: the class names, read before loading
    fsdp_on = cfg.train.parallel == "fsdp"  # the frozen base sharded across ranks
    if fsdp_on:  # only rank 0 reads the weights; the others get theirs in fsdp.shard
        model, tok, device = fsdp_load.load(cfg, d, device, targets)
    else:  # the base (with a new head for a task) on every rank
        model, tok = heads.load_model(cfg, device, targets)
        device = str(model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    # bitsandbytes repacks 4-bit weights in place on the first no-grad forward on CPU (an
    # eval, a GRPO rollout or reference pass); the fused LoRA op reads them packed
    exact_4bit_on_cpu(model)
    check_rank(model, cfg.lora.r)  # before lora_A / lora_B are allocated at that rank
    model = attach_lora(model, cfg.lora)
    if cfg.lora.init_from:  # e.g. GRPO from an SFT adapter
        start_from(model, cfg.lora.init_from, tok, cfg.lora.r, cfg.lora.alpha)
    if dtype != torch.float32:
        # Under autocast the matmuls run in bf16 anyway: peft's cast of every LoRA input to
        # the fp32 adapter dtype would only add a copy per layer (scripts/bench_train.py
        # measures the switch on the baseline).
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    set_adapter_training(model, True)
    if d.active and not fsdp_on:  # under fsdp rank 0's LoRA comes with its base
        distributed.broadcast_params(d, [p for p in model.parameters() if p.requires_grad])
    data, batcher, eval_batcher = objective.load_data(cfg, tok, targets, d)
    steps = total_steps(cfg, batcher.batches_per_epoch())
    speed = accelerate(model, cfg.train, device, steps)  # checkpointing, fused LoRA, compile
    sharded = fsdp.shard(model, d, dtype, tok, device) if fsdp_on else None
    opt = make_optimizer(model.parameters(), cfg.train)
    stats = {"format": cfg.data.format, "files": data_files(cfg.data), "train": data.train.stats,
             "eval": data.eval.stats if data.eval else None}
    scaler = torch.amp.GradScaler(device.split(":")[0]) if dtype == torch.float16 else None
    run = Run(cfg, model, tok, batcher, eval_batcher, opt, make_scheduler(opt, cfg.train, steps),
              device, dtype, Path(cfg.output.dir), steps, stats, scaler=scaler, dist=d,
              objective=objective, speed=speed, fsdp=sharded)
    objective.prepare(run, resume, progress)  # e.g. DPO's reference log-probs for every pair
    return run


def fit(run: Run, signals: StopSignals, progress: bool = False,
        stop_after: int | None = None) -> Outcome:
    """Step to the end (FINISHED) or for `stop_after` steps of this run (PAUSED).

    Evaluates and checkpoints as the recipe says. A stop signal (on any rank) writes a
    checkpoint and raises `Interrupted`.
    """
    t = run.cfg.train
    start = run.step
    with Progress(run, progress) as report:
        while run.step < run.total_steps:
            m = step(run)
            if run.step == start + 1 and run.speed.get("compile"):
                log.info("first step (includes torch.compile): %.1f s", m["seconds"])
                m["compile_seconds"] = m["seconds"]
            if due(t.eval_every, run.step, run.total_steps):
                m.update(eval_line(evaluate(run) or {"loss": None}))
            report.record(m)
            if report.early_stop():  # train.early_stop_patience: finish here
                break
            if due(t.save_every, run.step, run.total_steps):
                save(run)
            if stop_after is not None and start + stop_after <= run.step < run.total_steps:
                report.close("paused")
                log.info("paused at step %d; checkpoint %s; continue with --resume",
                         run.step, save(run))
                return Outcome.PAUSED
            if _stop_requested(run, signals):
                report.close("stopped")
                raise Interrupted(f"stopped at step {run.step}; checkpoint {save(run)}. Resume "
                                  "with: adapters train RECIPE --resume",
                                  signals.requested or signal.SIGTERM)
        report.close()
        report.record_eval(evaluate(run))
    summary = report.summary()
    save(run, final=True, training=summary)
    if run.dist.main:
        plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
        report.log_done(summary)
    return Outcome.FINISHED


def step(run: Run) -> dict:
    """One optimiser step at `run.step`: advances the step and token counters, returns metrics.

    The gradient is that of the mean loss over every trainable token of the step (all
    micro-batches, all ranks). A non-finite step is counted and skipped, not applied.
    """
    t0 = time.perf_counter()
    micro = micro_batches(run, run.step)
    counted = sum(heads.counted(b) for b in micro)  # trainable tokens, or head examples
    tokens = sum(int(b["n_tokens"]) for b in micro)
    norms = run.objective.normalisers(micro)  # the objective's own counts (pairs, ...)
    if run.dist.active:  # divide by the global batch's count: ranks then sum to the mean
        counted, tokens, *norms = map(int, distributed.all_sum(
            run.dist, [counted, tokens, *norms], run.device))
    loss, sums = 0.0, {}
    for b in micro:
        b = {k: v.to(run.device) for k, v in b.items()}
        with autocast_for(run.device, run.dtype):
            part = run.objective.micro_loss(run.model, b, counted, norms, sums)
        (run.scaler.scale(part) if run.scaler else part).backward()
        loss += float(part.detach())
    params = [p for g in run.optimizer.param_groups for p in g["params"]]  # the adapter's
    if run.dist.active:
        loss = distributed.sum_grads(run.dist, params, loss)
    grad_norm, finite = apply_update(run, params, loss)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.step += 1
    run.tokens += tokens
    run.trainable_tokens += counted
    dt = time.perf_counter() - t0
    m = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
         "trainable_tokens": counted, "tokens_per_s": tokens / dt, "seconds": dt,
         "finite": finite}
    m.update(run.objective.metrics(sums, norms, run.dist, run.device))
    count_bad(run, m)
    return m


def evaluate(run: Run) -> dict | None:
    """Mean loss and perplexity on the eval split; rank 0 evaluates, the others go on."""
    # Under FSDP every rank runs the forward (it gathers the sharded weights): all evaluate.
    if run.eval_batcher is None or not (run.dist.main or run.cfg.train.parallel == "fsdp"):
        return None
    return run.objective.evaluate(run.model, run.eval_batcher.iter_all(), run.device, run.dtype)


def save(run: Run, final: bool = False, training: dict | None = None) -> Path:
    """A checkpoint (resumable) and, when final, the adapter at the output folder's top.

    Under torchrun only rank 0 writes: every rank holds the same weights and optimiser state.
    """
    objective_state = run.objective.state(run.dist)  # e.g. GRPO's rollouts in use, all ranks'
    if not run.dist.main:
        return run.out / "checkpoints"
    man = heads.with_task(manifest_for(run, training), run.model)  # + the head's labels
    state = {"step": run.step, "tokens": run.tokens, "trainable_tokens": run.trainable_tokens,
             "bad_in_a_row": run.bad_in_a_row, "bad_total": run.bad_total,
             "scheduler": run.scheduler.state_dict(),
             "scaler": run.scaler.state_dict() if run.scaler else None,
             "recipe": run.cfg.to_dict(), "world_size": run.dist.world,
             "objective": objective_state}
    path = ckpt.save_checkpoint(
        run.out / "checkpoints", run.step,
        lambda d, name: save_adapter(run.model, d, man, run.adapter, name), run.optimizer, state,
        run.cfg.train.keep_checkpoints)
    if final:
        save_adapter(run.model, run.out, man, run.adapter)
    return path


def restore(run: Run, path: Path, state: dict) -> None:
    """Continue exactly where a checkpoint left off: weights, optimiser, schedule, RNG, data."""
    set_peft_model_state_dict(run.model, load_file(path / WEIGHTS_FILE), run.adapter)
    ckpt.load_optimizer(path, run.optimizer)
    if "scheduler" in state:
        run.scheduler.load_state_dict(state["scheduler"])
    else:  # written before the schedule's state was saved: replay it to the same step
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(state["step"]):
                run.scheduler.step()
    for key in ("step", "tokens", "trainable_tokens", "bad_in_a_row", "bad_total"):
        setattr(run, key, state[key])
    run.objective.load_state(state.get("objective"), run.dist)
    if run.scaler and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])
    if run.dist.main:
        truncate_metrics(run.out / "metrics.jsonl", run.step)
    log.info("resumed from %s at step %d", path, run.step)


# ---- helpers of the story above (jobs.py shares them) -------------------------------------

def micro_batches(run: Run, step: int) -> list[dict]:
    """The `grad_accum` batches of optimiser step `step` (a function of the step: resumable)."""
    return run.objective.micro_batches(run, step)


def apply_update(run: Run, params: list[torch.Tensor], loss: float) -> tuple[float, bool]:
    """Clip, then apply the gradients unless non-finite; returns (grad norm, finite)."""
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    max_norm = run.cfg.train.max_grad_norm or float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
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
    return grad_norm, finite


def count_bad(run: Run, m: dict) -> None:
    """Count a non-finite step; stop after max_bad_steps in a row (last checkpoint intact)."""
    if m["finite"]:
        run.bad_in_a_row = 0
        return
    run.bad_in_a_row += 1
    run.bad_total += 1
    log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped "
                "(%d in a row, %d in total)", m["step"], m["loss"], m["grad_norm"],
                run.bad_in_a_row, run.bad_total)
    if run.bad_in_a_row >= run.cfg.train.max_bad_steps:
        raise TrainingError(
            f"step {m['step']}: {run.bad_in_a_row} non-finite steps in a row "
            f"(train.max_bad_steps={run.cfg.train.max_bad_steps}); stopped. The last good "
            f"checkpoint in {run.out / 'checkpoints'} is intact: lower train.lr or check the "
            "data, then resume with --resume")


def due(every: int, step: int, last: int) -> bool:
    """Every `every` steps, but not at the last step (the end of the run does its own)."""
    return bool(every) and step % every == 0 and step != last


def _stop_requested(run: Run, signals: StopSignals) -> bool:
    stop = signals.requested is not None
    if run.dist.active:  # a signal one rank caught stops all of them at this step
        stop = distributed.any_rank(run.dist, stop, run.device)
    return stop


def manifest_for(run: Run, training: dict | None = None) -> Manifest:
    base = run.model.get_base_model()
    extra = {"training": training} if training else {}
    if run.fsdp:  # sharded: the base's fingerprint was taken before
        return new_manifest(run.cfg.model.name, run.fsdp["fingerprint"],
                            quantization=run.cfg.model, lora=run.cfg.lora, data=run.data_stats,
                            recipe=run.cfg.to_dict(), **extra)
    return build_manifest(base, run.tokenizer, run.cfg.model.name, run.cfg.model, run.cfg.lora,
                          {"data": run.data_stats, "recipe": run.cfg.to_dict(), **extra})
