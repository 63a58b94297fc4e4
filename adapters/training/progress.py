"""What a run reports: pre-flight figures, then per step a metrics.jsonl line, the progress bar
and an ETA, and at the end the summary that goes into the adapter's manifest.

Rank 0 speaks for all ranks: the others write their metrics lines to os.devnull.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import TrainingError
from ..io import atomic_write_text
from ..lora import trainable_report
from .fsdp import per_rank_estimate
from .runtime import estimate_memory, peak_memory_bytes
from .trackers import Trackers

log = logging.getLogger(__name__)


def eval_line(ev: dict) -> dict:
    """An evaluation's figures for a step's metrics line: its loss and every reward*."""
    return {f"eval_{k}": v for k, v in ev.items() if k == "loss" or k.startswith("reward")}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past the checkpoint (the resumed run writes them again) and the
    paused / stopped marks (it goes on)."""
    if path.is_file():
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        lines = [json.dumps(r) for r in rows if r.get("step", 0) <= step and "event" not in r]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def preflight(run) -> dict:
    """Sizes, memory estimate and checkpoint size before the first step; warns when short."""
    rep = trainable_report(run.model)
    t = run.cfg.train
    est = estimate_memory(run.model, t.batch_size, run.cfg.data.max_seq_len,
                          getattr(run.tokenizer, "vocab_size", 0))
    est = per_rank_estimate(run.fsdp, est)  # FSDP: each rank holds its shard of the base
    info = {"trainable_params": rep["trainable"], "total_params": rep["total"],
            "trainable_percent": rep["percent"], "steps": run.total_steps,
            "tokens_per_step_max": t.batch_size * t.grad_accum * run.cfg.data.max_seq_len,
            "estimated_peak_bytes": est["total"], "free_memory_bytes": est["free"],
            "train_examples": run.data_stats["train"]["examples"],
            "checkpoint_bytes": rep["trainable"] * 4 * 3 + (1 << 20)}  # weights + 2 moments
    log.info("pre-flight: %s", json.dumps(info))
    if est.get("machine") and est["total"] > est["machine"] and str(run.device).startswith("cpu"):
        raise TrainingError(
            f"estimated peak memory {est['total'] / 1e9:.1f} GB is more than this machine's "
            f"{est['machine'] / 1e9:.1f} GB of memory and swap: lower train.batch_size "
            f"({t.batch_size}) or data.max_seq_len ({run.cfg.data.max_seq_len}), or enable "
            "train.gradient_checkpointing")
    if est["free"] and est["total"] > est["free"]:
        log.warning("estimated peak memory %.1f GB exceeds the free %.1f GB: lower "
                    "train.batch_size or data.max_seq_len, or enable gradient_checkpointing",
                    est["total"] / 1e9, est["free"] / 1e9)
    return info


class Progress:
    """The reports of one `fit`: a context that holds the bar and the metrics file open."""

    def __init__(self, run, show: bool):
        self.run, self.show = run, show
        self.start, self.tokens0 = run.step, run.tokens
        self.t0 = time.perf_counter()
        self.step_seconds = 0.0  # time in training steps only (no eval, no checkpoint writes)
        self.eval_loss: float | None = None
        self.best_eval: float | None = None
        self.evals_since_best = 0
        self.stopped_early_at: int | None = None
        self.last: dict = {}
        self.trackers = Trackers.open(run)  # train.report_to; before any file opens
        self.bar = tqdm(total=run.total_steps, initial=run.step, disable=not show, unit="step",
                        dynamic_ncols=True, desc="train")
        path = run.out / "metrics.jsonl" if run.dist.main else os.devnull
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        self.file.close()
        self.trackers.close(failed=exc[0] is not None)
        return False

    def close(self, event: str | None = None) -> None:
        """End the bar (before the last log lines of a run); closing twice is harmless.
        event: "paused" / "stopped": a metrics row saying the run stopped at this step (the
        web page's board reads it; plots and trackers skip it)."""
        self.bar.close()
        if event and not self.file.closed:
            self.file.write(json.dumps({"step": self.run.step, "event": event}) + "\n")
            self.file.flush()

    def record(self, m: dict) -> None:
        """After a step: its metrics line when due (always for a bad step or an eval)."""
        run, t = self.run, self.run.cfg.train
        self.step_seconds += m["seconds"]
        self.last = m
        if "eval_loss" in m:
            self.eval_loss = m["eval_loss"]
            self._track_best(m["eval_loss"])
        if run.step % t.log_every == 0 or not m["finite"] or "eval_loss" in m:
            m["peak_memory_bytes"] = peak_memory_bytes(run.device)
            m["tokens_total"] = run.tokens
            self._write(m)
        if run.step - self.start == 3 and not self.show and run.dist.main:
            per_step = (time.perf_counter() - self.t0) / 3
            left = run.total_steps - run.step
            log.info("ETA: %.0f s for the remaining %d steps (%.2f s/step)", per_step * left,
                     left, per_step)
        post = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}",
                "tok_s": f"{m['tokens_per_s']:.0f}"}
        if "reward" in m:  # GRPO: the reward, and where the step's time went
            post.update(reward=f"{m['reward']:.3f}", rollout_s=f"{m['rollout_seconds']:.1f}")
        self.bar.set_postfix(post)
        self.bar.update(1)

    def _track_best(self, loss: float | None) -> None:
        if loss is None:
            return
        delta = self.run.cfg.train.early_stop_min_delta
        if self.best_eval is None or loss < self.best_eval - delta:
            self.best_eval, self.evals_since_best = loss, 0
        else:
            self.evals_since_best += 1

    def early_stop(self) -> bool:
        """True (once, logged) when train.early_stop_patience evaluations in a row brought no
        improvement: the run then finishes where it is."""
        patience = self.run.cfg.train.early_stop_patience
        if not patience or self.evals_since_best < patience or self.stopped_early_at:
            return False
        self.stopped_early_at = self.run.step
        log.info("early stop at step %d: %d evaluations without an eval loss below %.4f",
                 self.run.step, patience, self.best_eval)
        return True

    def record_eval(self, ev: dict | None) -> None:
        """The end-of-run evaluation (None on ranks other than 0)."""
        if ev is not None:
            self.eval_loss = ev["loss"]
            # a task head has accuracy (classification) or MAE (regression), no perplexity
            self._write({"step": self.run.step, "eval_loss": ev["loss"],
                         **{f"eval_{k}": ev[k] for k in ev if k in ("perplexity", "accuracy",
                                                                    "mae") or
                            k.startswith("reward")}})

    def _write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.trackers.log(row)

    def summary(self) -> dict:
        """The run's figures for the manifest's `training` section."""
        run = self.run
        tokens = run.tokens - self.tokens0
        return {"steps": run.step, "tokens": run.tokens, "trainable_tokens": run.trainable_tokens,
                "seconds": round(time.perf_counter() - self.t0, 2),
                "train_seconds": round(self.step_seconds, 2),
                "tokens_per_s": round(tokens / max(self.step_seconds, 1e-9), 1),
                "peak_memory_bytes": peak_memory_bytes(run.device),
                "final_train_loss": self.last.get("loss"), "final_eval_loss": self.eval_loss,
                "bad_steps": run.bad_total, "dtype": str(run.dtype).replace("torch.", ""),
                "global_batch": run.cfg.train.batch_size * run.cfg.train.grad_accum
                * run.dist.world, "ranks": run.dist.world,
                **({"stopped_early_at": self.stopped_early_at, "best_eval_loss": self.best_eval}
                   if self.stopped_early_at else {})}

    def log_done(self, summary: dict) -> None:
        run = self.run
        eval_loss = summary["final_eval_loss"]
        log.info("done: %d steps (%d this run), global batch %d (%d rank%s), loss %.4f%s, "
                 "%.0f tokens/s, peak memory %.2f GB, adapter in %s", run.step,
                 run.step - self.start, summary["global_batch"], run.dist.world,
                 "s" if run.dist.world > 1 else "", summary["final_train_loss"] or float("nan"),
                 f", eval loss {eval_loss:.4f}" if eval_loss is not None else "",
                 summary["tokens_per_s"], summary["peak_memory_bytes"] / 1e9, run.out)
