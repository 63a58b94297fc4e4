"""Many adapters on one base, in one pass: the jobs of a recipe (recipe_jobs.py) trained
together, each ending exactly where a run of its own would.

The base is loaded (and quantised) once; each job is one more peft adapter on it, named after
the job, with its own data, optimiser, schedule, clipping, non-finite guard, checkpoints and
output folder: a `Run` per job, so saving, resuming and evaluating are the single-run code.

A step draws each job's micro-batch, stacks them along the batch dimension (stack.py pads them
to one length) and runs the decoder once; every LoRA layer adds each job's term to that job's
rows only (kernels/lora_rows.py). The loss of each job is its objective's, on its rows of the
hidden states, divided by its own counts, and one backward of the sum fills each job's
gradients (the adapters are disjoint and the base is frozen). Then each job's optimiser steps.
A job with fewer accumulation micro-batches sits out the later ones; a job that finishes or
fails (too many non-finite steps) drops out and the rest go on.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapter import start_from
from ..config import dump_recipe
from ..errors import TrainingError
from ..io import atomic_write_text
from ..kernels.lora_rows import RowGroups, install_row_groups
from ..lora import attach_lora, check_rank, set_adapter_training
from ..model import exact_4bit_on_cpu, resolve_dtype
from ..recipe_jobs import Job, check_jobs, peft_name
from . import checkpoint as ckpt
from . import distributed, heads
from .accelerate import accelerate
from .loss import autocast_for
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
from .stack import HiddenView, stack_batches
from .trainer import (
    Outcome,
    Run,
    apply_update,
    count_bad,
    due,
    restore,
    save,
)

log = logging.getLogger(__name__)


def train_jobs(jobs: list[Job], resume: str | None = None, progress: bool = False,
               device: str | None = None, stop_after: int | None = None) -> list[Path]:
    """Train every job's adapter in one pass; returns their output folders (in job order).

    resume: "latest" (each job's newest checkpoint) or None. stop_after: pause every job after
    this many steps of this pass (checkpoints written).
    """
    check_jobs(jobs)
    if distributed.from_env().world > 1:
        raise TrainingError("jobs train on one process (one base, stacked batches); run "
                            "without torchrun / --nproc")
    for job in jobs:
        prepare_output(Path(job.cfg.output.dir), fresh=not resume, main=True)
    found = _resumable(jobs) if resume else {}
    runs, rows = setup_jobs(jobs, device, resume=bool(found), progress=progress)
    kept = keep_freed_host_memory()
    try:
        for run in runs:
            if run.adapter in found:
                restore(run, *found[run.adapter])
            atomic_write_text(run.out / "recipe.resolved.yaml", dump_recipe(run.cfg))
            # one checkpoint: this job's LoRA and its two AdamW moments (fp32), and the files
            mine = sum(p.numel() for g in run.optimizer.param_groups for p in g["params"])
            check_disk(run.out, (mine * 4 * 3 + (1 << 20)) * (run.cfg.train.keep_checkpoints + 2))
        preflight(runs[0])  # sizes and the memory estimate (of one job's batch)
        with StopSignals() as signals:
            fit_jobs(runs, rows, signals, progress, stop_after)
    finally:
        outs = [run.out for run in runs]
        del runs
        give_back_host_memory(kept)
    return outs


def _resumable(jobs: list[Job]) -> dict[str, tuple]:
    """Each job's newest checkpoint (peft name -> (path, state)); a job that wrote none yet
    (it failed early, or saves less often than the others) starts again from step 0."""
    found = {}
    for j in jobs:
        if not ckpt.list_checkpoints(Path(j.cfg.output.dir) / "checkpoints"):
            log.warning("job %s has no checkpoint yet: it starts again from step 0", j.name)
            truncate_metrics(Path(j.cfg.output.dir) / "metrics.jsonl", 0)
            continue
        found[peft_name(j.name)] = ckpt.resumable(j.cfg, "latest", 1)
    return found


def job_name(run: Run) -> str:
    """The job's name as logs show it (run.adapter is recipe_jobs.peft_name of it)."""
    return run.adapter.removeprefix("job_")


def setup_jobs(jobs: list[Job], device: str | None = None, resume: bool = False,
               progress: bool = False) -> tuple[list[Run], RowGroups]:
    """One base, an adapter per job, each job's data, optimiser and schedule: runs at step 0."""
    cfg0 = jobs[0].cfg
    for job in jobs:
        check_output_dir(Path(job.cfg.output.dir))
    objectives = [objective_for(job.cfg) for job in jobs]
    seed_all(cfg0.train.seed)
    d = distributed.init(cfg0.train.dist_timeout_s)
    model, tok = heads.load_model(cfg0, distributed.device_for(d, device), None)
    device = str(model.device)
    dtype = resolve_dtype(cfg0.model.dtype, device)
    exact_4bit_on_cpu(model)
    for job in jobs:
        check_rank(model, job.cfg.lora.r)
        seed_all(job.cfg.train.seed)  # the same init as the job's run of its own
        model = attach_lora(model, job.cfg.lora, peft_name(job.name))
        if job.cfg.lora.init_from:
            start_from(model, job.cfg.lora.init_from, tok, job.cfg.lora.r, job.cfg.lora.alpha,
                       peft_name(job.name))
    if dtype != torch.float32:  # as trainer.setup: autocast does the LoRA matmuls in bf16
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    set_adapter_training(model, True)
    data = [o.load_data(j.cfg, tok, None, d) for o, j in zip(objectives, jobs, strict=True)]
    steps = [total_steps(j.cfg, b.batches_per_epoch()) for j, (_, b, _) in zip(jobs, data,
                                                                                strict=True)]
    # one set of speed switches (shared by recipe_jobs.SHARED); the per-row loop is Python,
    # which compiled blocks would have to guard on
    speed = accelerate(model, dataclasses.replace(cfg0.train, compile=False), device, max(steps))
    rows = RowGroups()
    install_row_groups(model, rows)
    runs = []
    for job, objective, (stats_data, batcher, eval_batcher), n in zip(
            jobs, objectives, data, steps, strict=True):
        mine = f".{peft_name(job.name)}."
        params = [p.requires_grad_(True) for name, p in model.named_parameters()
                  if mine in name]  # its LoRA (see below for the requires_grad)
        opt = make_optimizer(params, job.cfg.train)
        stats = {"format": job.cfg.data.format, "train": stats_data.train.stats,
                 "eval": stats_data.eval.stats if stats_data.eval else None}
        run = Run(job.cfg, model, tok, batcher, eval_batcher, opt,
                  make_scheduler(opt, job.cfg.train, n), device, dtype, Path(job.cfg.output.dir),
                  n, stats, dist=d, objective=objective, speed=speed,
                  adapter=peft_name(job.name))
        with rows.set(only=run.adapter):
            objective.prepare(run, resume, progress)  # e.g. DPO's reference log-probs
        runs.append(run)
    # peft re-enabling adapters after an adapter-off reference (DPO's) marks only its active
    # adapter trainable: every job's LoRA learns
    for run in runs:
        for group in run.optimizer.param_groups:
            for p in group["params"]:
                p.requires_grad_(True)
    return runs, rows


def fit_jobs(runs: list[Run], rows: RowGroups, signals: StopSignals, progress: bool = False,
             stop_after: int | None = None) -> Outcome:
    """Step every job to its end; evaluates, checkpoints and finishes each as its recipe says.

    A stop signal writes every live job's checkpoint and raises `Interrupted`.
    """
    start = {run.adapter: run.step for run in runs}
    live = [run for run in runs if run.step < run.total_steps]
    reports = {run.adapter: Progress(run, False) for run in runs}  # each job's metrics file
    bar = tqdm(total=sum(r.total_steps for r in runs), initial=sum(r.step for r in runs),
               disable=not progress, unit="step", dynamic_ncols=True, desc=f"{len(runs)} jobs")
    try:
        while live:
            results = step_jobs(live, rows)
            for run in list(live):
                if not _after_step(run, results[run.adapter], rows, reports):
                    live.remove(run)
            bar.update(len(results))
            bar.set_postfix({job_name(r): f"{results[r.adapter]['loss']:.3f}"
                             for r in runs if r.adapter in results})
            paused = stop_after is not None and any(
                start[r.adapter] + stop_after <= r.step for r in live)
            if paused or signals.requested is not None:
                bar.close()
                for run in live:
                    reports[run.adapter].close("paused" if paused else "stopped")
                saved = [str(save(run)) for run in live]
                if paused:
                    log.info("paused; checkpoints %s; continue with --resume", ", ".join(saved))
                    return Outcome.PAUSED
                raise Interrupted(f"stopped; checkpoints {', '.join(saved)}. Resume: the same "
                                  "command (adapters train / adapters sweep) with --resume",
                                  signals.requested or signal.SIGTERM)
    finally:
        bar.close()
        exc = sys.exc_info()
        for report in reports.values():  # trackers see a failed pass as failed
            report.__exit__(*exc)
    return Outcome.FINISHED


def _after_step(run: Run, m: dict, rows: RowGroups, reports: dict[str, Progress]) -> bool:
    """A job's step done: its guard, eval, metrics line, checkpoint, finish; False when the
    job leaves the pass (finished, or failed: its last checkpoint stays intact)."""
    try:
        count_bad(run, m)
    except TrainingError as e:
        log.error("job %s failed: %s", job_name(run), e)
        reports.pop(run.adapter).__exit__(type(e), e, e.__traceback__)  # its trackers: failed
        return False
    if due(run.cfg.train.eval_every, run.step, run.total_steps):
        m.update(eval_line(evaluate_job(run, rows) or {"loss": None}))
    reports[run.adapter].record(m)
    if due(run.cfg.train.save_every, run.step, run.total_steps):
        save(run)
    if run.step >= run.total_steps or reports[run.adapter].early_stop():
        _finish(run, rows, reports[run.adapter])
        return False
    return True


def _finish(run: Run, rows: RowGroups, report: Progress) -> None:
    report.record_eval(evaluate_job(run, rows))
    summary = report.summary()
    save(run, final=True, training=summary)
    plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
    log.info("job %s done: %d steps, loss %.4f, adapter in %s", job_name(run), run.step,
             summary["final_train_loss"] or float("nan"), run.out)


def evaluate_job(run: Run, rows: RowGroups) -> dict | None:
    """The job's eval split through its adapter alone."""
    if run.eval_batcher is None:
        return None
    with rows.set(only=run.adapter):
        return run.objective.evaluate(run.model, run.eval_batcher.iter_all(), run.device,
                                      run.dtype)


def step_jobs(runs: list[Run], rows: RowGroups) -> dict[str, dict]:
    """One optimiser step of every job in `runs`, their micro-batches stacked; metrics by job.

    Each job's gradient is that of its own mean loss, as in trainer.step.
    """
    t0 = time.perf_counter()
    plans = []
    for run in runs:
        micro = run.objective.micro_batches(run, run.step)
        plans.append({"run": run, "micro": micro, "sums": {}, "loss": 0.0,
                      "counted": sum(heads.counted(b) for b in micro),
                      "tokens": sum(int(b["n_tokens"]) for b in micro),
                      "norms": run.objective.normalisers(micro)})
    per = per_forward(runs[0].cfg.train.jobs_per_forward, runs[0].device, len(plans))
    forwards = 0
    for k in range(max(len(p["micro"]) for p in plans)):
        now = [p for p in plans if k < len(p["micro"])]
        for i in range(0, len(now), per):
            _micro_step(now[i:i + per], k, rows)
            forwards += 1
    dt = time.perf_counter() - t0
    out = {}
    for p in plans:
        run = p["run"]
        params = [q for g in run.optimizer.param_groups for q in g["params"]]
        grad_norm, finite = apply_update(run, params, p["loss"])
        lr = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
        run.step += 1
        run.tokens += p["tokens"]
        run.trainable_tokens += p["counted"]
        m = {"step": run.step, "loss": p["loss"], "lr": lr, "grad_norm": grad_norm,
             "tokens": p["tokens"], "trainable_tokens": p["counted"],
             "tokens_per_s": p["tokens"] / dt, "seconds": dt, "finite": finite,
             "jobs_in_step": len(plans), "forwards_in_step": forwards}
        m.update(run.objective.metrics(p["sums"], p["norms"], run.dist, run.device))
        out[run.adapter] = m
    return out


def per_forward(setting: int, device: str, jobs: int) -> int:
    """How many jobs' micro-batches share one forward: train.jobs_per_forward, or with 0
    (auto) one at a time on CPU, where the matmuls are compute-bound already and stacking only
    multiplies the activations held (scripts/bench_jobs.py), and all of them on CUDA."""
    if setting:
        return setting
    return jobs if str(device).startswith("cuda") else 1


def _micro_step(plans: list[dict], k: int, rows: RowGroups) -> None:
    """Micro-batch k of each job in `plans`: one stacked forward, each job's loss, one
    backward."""
    run0 = plans[0]["run"]
    device, dtype = run0.device, run0.dtype
    batches = [{key: v.to(device) for key, v in p["micro"][k].items()} for p in plans]
    inputs, spans = stack_batches(batches, run0.tokenizer.pad_token_id)
    T = inputs["input_ids"].shape[1]
    groups = [(p["run"].adapter, b0 * T, b1 * T) for p, (b0, b1) in zip(plans, spans,
                                                                        strict=True)]
    base = run0.model.get_base_model()
    # the groups stay set through backward: checkpointed blocks run their forward again there
    with rows.set(groups=groups):
        with autocast_for(device, dtype):
            hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B,T,H)
            total = 0.0
            for p, (b0, b1), b in zip(plans, spans, batches, strict=True):
                view = HiddenView(base, hidden[b0:b1, :b["input_ids"].shape[1]])
                part = p["run"].objective.micro_loss(view, b, p["counted"], p["norms"],
                                                     p["sums"])
                p["loss"] += float(part.detach())
                total = total + part
        total.backward()
