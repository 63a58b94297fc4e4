"""The step loop around train_step: progress, metrics, eval, checkpoints, stop and summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

from ..errors import TrainingError
from . import distributed
from .plots import plot_losses
from .runtime import peak_memory_bytes

log = logging.getLogger(__name__)


class Interrupted(TrainingError):
    """Stopped by SIGINT/SIGTERM after writing a checkpoint; resume with --resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _bar(run, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=run.step, disable=not progress, unit="step",
                dynamic_ncols=True, desc="train")


def _record(run, m: dict, metrics_file) -> None:
    m["peak_memory_bytes"] = peak_memory_bytes(run.device)
    m["tokens_total"] = run.tokens
    metrics_file.write(json.dumps(m) + "\n")
    metrics_file.flush()


def _guard(run, m: dict) -> None:
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


def _due(every: int, step: int, last: int) -> bool:
    return bool(every) and step % every == 0 and step != last


def run_loop(run, signals, progress: bool, stop_after: int | None = None) -> bool:
    """Run steps to the end (True) or until `stop_after` steps of this run (False)."""
    from .trainer import evaluate, save, train_step

    t = run.cfg.train
    start, tok0, t_start, eval_loss = run.step, run.tokens, time.perf_counter(), None
    step_seconds = 0.0  # time in training steps only (no eval, no checkpoint writes)
    bar = _bar(run, progress)
    metrics = run.out / "metrics.jsonl" if run.dist.main else os.devnull  # rank 0 writes
    with open(metrics, "a", encoding="utf-8") as mf:
        while run.step < run.total_steps:
            m = train_step(run, run.step)
            step_seconds += m["seconds"]
            if run.step == start and run.cfg.train.compile:
                log.info("first step (includes torch.compile): %.1f s", m["seconds"])
                m["compile_seconds"] = m["seconds"]
            run.step += 1
            run.tokens += m["tokens"]
            run.trainable_tokens += m["trainable_tokens"]
            _guard(run, m)
            if _due(t.eval_every, run.step, run.total_steps):
                ev = evaluate(run)
                m["eval_loss"] = eval_loss = ev["loss"] if ev else None
            if run.step % t.log_every == 0 or not m["finite"] or "eval_loss" in m:
                _record(run, m, mf)
            run.last = m
            if run.step - start == 3 and not progress and run.dist.main:
                per_step = (time.perf_counter() - t_start) / 3
                log.info("ETA: %.0f s for the remaining %d steps (%.2f s/step)",
                         per_step * (run.total_steps - run.step), run.total_steps - run.step,
                         per_step)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                            tok_s=f"{m['tokens_per_s']:.0f}")
            bar.update(1)
            if _due(t.save_every, run.step, run.total_steps):
                save(run)
            if stop_after is not None and run.step - start >= stop_after \
                    and run.step < run.total_steps:
                bar.close()
                path = save(run)
                log.info("paused at step %d; checkpoint %s; continue with --resume",
                         run.step, path)
                return False
            stop = signals.requested is not None
            if run.dist.active:  # a signal one rank caught stops all of them at this step
                stop = distributed.any_rank(run.dist, stop, run.device)
            if stop:
                bar.close()
                path = save(run)
                raise Interrupted(f"stopped at step {run.step}; checkpoint {path}. Resume with: "
                                  f"adapters train RECIPE --resume",
                                  signals.requested or signal.SIGTERM)
        bar.close()
        ev = evaluate(run)
        if ev is not None:
            eval_loss = ev["loss"]
            mf.write(json.dumps({"step": run.step, "eval_loss": eval_loss,
                                 "eval_perplexity": ev["perplexity"]}) + "\n")
    _finish(run, start, run.tokens - tok0, step_seconds, time.perf_counter() - t_start,
            eval_loss)
    return True


def _finish(run, start: int, tokens: int, seconds: float, wall: float,
            eval_loss: float | None) -> None:
    from .trainer import save

    steps_here = run.step - start
    summary = {"steps": run.step, "tokens": run.tokens, "trainable_tokens": run.trainable_tokens,
               "seconds": round(wall, 2), "train_seconds": round(seconds, 2),
               "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
               "peak_memory_bytes": peak_memory_bytes(run.device),
               "final_train_loss": run.last.get("loss"), "final_eval_loss": eval_loss,
               "bad_steps": run.bad_total, "dtype": str(run.dtype).replace("torch.", ""),
               "global_batch": run.cfg.train.batch_size * run.cfg.train.grad_accum
               * run.dist.world, "ranks": run.dist.world}
    save(run, final=True, training=summary)
    if not run.dist.main:
        return
    plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
    log.info("done: %d steps (%d this run), global batch %d (%d rank%s), loss %.4f%s, "
             "%.0f tokens/s, peak memory %.2f GB, adapter in %s", run.step, steps_here,
             summary["global_batch"], run.dist.world, "s" if run.dist.world > 1 else "",
             summary["final_train_loss"] or float("nan"),
             f", eval loss {eval_loss:.4f}" if eval_loss is not None else "",
             summary["tokens_per_s"], summary["peak_memory_bytes"] / 1e9, run.out)

