"""The GRPO objective: each step trains on rollouts of the live adapter, scored by rewards.

Per generation (every `grpo.num_iterations` optimiser steps), for each of the step's
`grad_accum` micro-batches: `train.batch_size` prompts (data/prompts.py), each sampled
`grpo.num_generations` times by the generation loop (generation/decode.py: one batch, each
row its own seeded sampler) on the model being trained, adapter on: no merge, no copy, no
second model, and its KV cache gone when the call returns. Rewards score each completion
(rewards.py), advantages are normalised per group of one prompt's completions
(grpo_loss.py), and the batch becomes prompt + completion sequences, packed padding-free
when data.packing (as sft batches are), with labels on the completion tokens only (EOS
included when the model stopped; none on a completion cut at `max_completion_length` when
`mask_truncated_completions`).

With `grpo.beta > 0` the adapter-off model's log-probs are computed once per generation,
under no_grad (the reference is the base itself); with `num_iterations > 1` so are the
sampling policy's (the importance ratios' denominator). A checkpoint taken between two
generations keeps the rollouts in use (`state()`), so a resumed run trains on the very same
completions; sampling seeds are a function of (train.seed, generation, micro-batch, the
prompt's place in the global batch, completion), so a resumed run draws the completions a
straight run would, and N ranks those of one rank with N times the batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from types import SimpleNamespace

import torch

from ..config import IGNORE_INDEX, RunConfig
from ..data.packing import collate_pairs, pack_bins
from ..data.prompts import Prompt, PromptSampler, build_prompts
from ..errors import ConfigError, TrainingError
from ..generation.decode import Request, Sampling, decode
from . import grpo_loss, rewards
from .distributed import Dist, all_sum, gather_objects
from .loss import autocast_for
from .objectives import label_logprobs

log = logging.getLogger(__name__)


class _Steps:
    """The trainer's batcher for GRPO: counts micro-batches of optimiser steps per epoch."""

    def __init__(self, sampler: PromptSampler, iterations: int):
        self.sampler, self.iterations = sampler, iterations

    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch() * self.iterations


class _EvalPrompts:
    def __init__(self, prompts: list[Prompt]):
        self.prompts = prompts

    def iter_all(self) -> list[Prompt]:
        return self.prompts


def _seed(*key: int) -> int:
    """A sampling seed per (train.seed, generation, micro-batch, place, completion)."""
    return int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16)


def _to_json(batch: dict) -> dict:
    return {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                "data": v.flatten().tolist()} for k, v in batch.items()}


def _from_json(batch: dict) -> dict:
    return {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).view(v["shape"])
            for k, v in batch.items()}


def _with_mask(b: dict) -> dict:
    """A micro-batch's attention mask back from `seq`: packed rows (position_ids) get the
    block-diagonal causal mask collate_packed makes (a pad token alone), padded rows 0/1."""
    seq = b["seq"]  # (B, T), -1 on padding
    if "position_ids" not in b:
        return {**b, "attention_mask": (seq >= 0).long()}
    T = seq.shape[1]
    doc = torch.where(seq >= 0, seq, -1 - torch.arange(T)[None, :].expand_as(seq))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return {**b, "attention_mask": ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]}


class Grpo:
    """train.objective: grpo (section `grpo` of the recipe)."""

    name = "grpo"

    def __init__(self, cfg: RunConfig):
        if cfg.model.task != "causal_lm":
            raise ConfigError("train.objective: grpo trains a causal LM (model.task: causal_lm)")
        if cfg.train.parallel == "fsdp":  # ranks decode different numbers of tokens, and
            # each sharded forward waits for every rank: use ddp (the base on every rank)
            raise ConfigError("train.objective: grpo runs with train.parallel: ddp, not fsdp")
        self.cfg, self.g = cfg, cfg.grpo
        self.rewards = rewards.resolve(cfg.grpo)  # an unknown reward fails before a load
        self.weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        self.keys = [f"reward_{r.name.rpartition(':')[2]}" for r in self.rewards]
        self.gen: tuple[int, list[dict]] | None = None  # (generation, its micro-batches)
        self.rollout_seconds = 0.0
        self.tok = None
        self.first = True  # the first step's time split is logged

    # -- data -------------------------------------------------------------------------------
    def load_data(self, cfg: RunConfig, tok, targets, d: Dist):
        train, ev = build_prompts(cfg.data, tok, self.g.max_completion_length, cfg.train.seed)
        self.prompts = train.prompts
        self.sampler = PromptSampler(len(train.prompts), cfg.train.batch_size, cfg.train.seed,
                                     (d.rank, d.world))
        data = SimpleNamespace(train=train, eval=ev)
        return (data, _Steps(self.sampler, self.g.num_iterations),
                _EvalPrompts(ev.prompts) if ev else None)

    def prepare(self, run, resume: bool, progress: bool) -> None:
        self.tok = run.tokenizer
        g, t = self.g, run.cfg.train
        log.info("pre-flight: grpo: %d prompts x %d completions of <= %d tokens per micro-batch, "
                 "%d micro-batch(es) per step, new rollouts every %d step(s); loss %s, beta %g; "
                 "rewards %s", t.batch_size, g.num_generations, g.max_completion_length,
                 t.grad_accum, g.num_iterations, g.loss_type, g.beta,
                 ", ".join(f"{r.name} x {r.weight:g}" for r in self.rewards))

    # -- rollouts ---------------------------------------------------------------------------
    def micro_batches(self, run, step: int) -> list[dict]:
        generation = step // self.g.num_iterations
        self.rollout_seconds = 0.0
        if self.gen is None or self.gen[0] != generation:
            t0 = time.perf_counter()
            self.gen = (generation, self._rollouts(run, generation))
            self.rollout_seconds = time.perf_counter() - t0
        return self.gen[1]

    def _rollouts(self, run, generation: int) -> list[dict]:
        ga, bpe = run.cfg.train.grad_accum, self.sampler.batches_per_epoch()
        was = run.model.training
        run.model.eval()  # no dropout while sampling, as when serving
        try:
            done = []  # per micro-batch: (rows, outputs, completion ids, rewards (S, R))
            for k in range(ga):
                epoch, index = divmod(generation * ga + k, bpe)
                idx = self.sampler.batch(epoch, index)
                # seeds by each prompt's place in the global batch: N ranks sample what one
                # rank with N times the batch samples
                seeds = [_seed(run.cfg.train.seed, generation, k, pos, j)
                         for pos in self.sampler.positions(epoch, index)
                         for j in range(self.g.num_generations)]
                rows, outs, ids = self._sample(run, [self.prompts[i] for i in idx], seeds)
                done.append((rows, outs, ids, self._score(rows, [o.text for o in outs], ids)))
            # groups never straddle micro-batches; scale_rewards: batch takes one std over
            # this rank's generation batch
            adv, _ = grpo_loss.advantages(torch.cat([d[3] for d in done]), self.weights,
                                          self.g.num_generations, self.g.scale_rewards)
            micro = [self._batch(run, *d, part) for d, part in
                     zip(done, adv.split([len(d[0]) for d in done]))]
            for b in micro:
                self._logprobs(run, b)
        finally:
            run.model.train(was)
        return micro

    def _sample(self, run, prompts: list[Prompt], seeds: list[int] | None):
        """Completions of each prompt: num_generations sampled with `seeds`, or one greedy."""
        g = self.g
        n = 1 if seeds is None else g.num_generations
        reqs = [Request(p.ids, None, Sampling(
            max_new_tokens=g.max_completion_length,
            temperature=0.0 if seeds is None else g.temperature, top_p=g.top_p,
            seed=None if seeds is None else seeds[i]))
            for i, p in enumerate(p for p in prompts for _ in range(n))]
        with autocast_for(run.device, run.dtype):
            outs = decode(run.model, run.tokenizer, reqs, peft=False)
        failed = [o for o in outs if o.finish_reason == "error"]
        if failed:
            raise TrainingError(f"rollout failed: {failed[0].error}")
        eos = run.tokenizer.eos_token_id
        ids = [o.token_ids + ([eos] if o.finish_reason == "stop" and eos is not None else [])
               for o in outs]
        rows = [p for p in prompts for _ in range(n)]
        return rows, outs, ids

    def _score(self, rows: list[Prompt], texts: list[str], ids: list[list[int]]) -> torch.Tensor:
        names = sorted({k for r in rows for k in r.columns})
        columns = {k: [r.columns.get(k) for r in rows] for k in names
                   if k not in ("prompts", "completions", "completion_ids")}
        values = rewards.score(self.rewards, [r.text for r in rows], texts, ids, columns,
                               [r.where for r in rows])
        return torch.tensor(values, dtype=torch.float32)  # (S, R)

    def _batch(self, run, rows: list[Prompt], outs, ids: list[list[int]],
               values: torch.Tensor, adv: torch.Tensor) -> dict:
        """One micro-batch of prompt + completion sequences, packed padding-free (block-
        diagonal attention, as for sft) when data.packing, else one per row. Labels on the
        completion tokens (none on a truncated one with mask_truncated_completions); the
        per-completion tensors follow `seq`, the order of the sequences in the rows."""
        cut = [o.finish_reason == "length" for o in outs]
        skip = [self.g.mask_truncated_completions and c for c in cut]
        examples = [(r.ids + c, [IGNORE_INDEX] * len(r.ids) + ([IGNORE_INDEX] * len(c)
                     if no else c)) for r, c, no in zip(rows, ids, skip)]
        lengths = [len(e[0]) for e in examples]
        # rows no longer than the longest sequence: padding goes, and attention's (T, T)
        # stays what the padded layout would have
        bins = pack_bins(lengths, max(lengths)) if self.cfg.data.packing else [
            [i] for i in range(len(examples))]
        order = torch.tensor([i for b in bins for i in b])  # seq k is completion order[k]
        pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
        batch = collate_pairs([[examples[i] for i in b] for b in bins], pad, packing=True)
        lengths = torch.tensor([len(c) for c in ids], dtype=torch.float32)
        return {**batch, "rewards": values[order], "advantages": adv[order].contiguous(),
                "completion_length": lengths[order],
                "truncated": torch.tensor(cut, dtype=torch.float32)[order]}

    @torch.no_grad()
    def _logprobs(self, run, b: dict) -> None:
        """The sampling policy's (num_iterations > 1) and the reference's (beta > 0) log-probs
        of the counted tokens (N,), once per generation."""
        if self.g.num_iterations == 1 and self.g.beta == 0.0:
            return
        x = {k: b[k].to(run.device) for k in ("input_ids", "attention_mask", "labels",
                                              "position_ids") if k in b}
        with autocast_for(run.device, run.dtype):
            if self.g.num_iterations > 1:
                b["old_logps"] = label_logprobs(run.model, x)[0].float().cpu()
            if self.g.beta != 0.0:
                with run.model.disable_adapter():
                    b["ref_logps"] = label_logprobs(run.model, x)[0].float().cpu()

    # -- the step ---------------------------------------------------------------------------
    def normalisers(self, micro: list[dict]) -> list[int]:
        """[completions, counted completion tokens] of the step."""
        return [sum(len(b["advantages"]) for b in micro),
                sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)]

    def micro_loss(self, model, batch: dict, counted: int, norms: list[int],
                   sums: dict[str, float]) -> torch.Tensor:
        lp, keep = label_logprobs(model, batch)  # (N,) fp32
        seq = batch["seq"][:, 1:][keep]  # (N,): the completion each token is in
        old = batch["old_logps"] if "old_logps" in batch else lp.detach()
        terms = grpo_loss.token_terms(self.g, lp, old, batch.get("ref_logps"),
                                      batch["advantages"][seq])
        loss = grpo_loss.reduce(self.g, terms["loss"], seq, len(batch["advantages"]), *norms)
        self._add_sums(batch, terms, sums)
        return loss

    def _add_sums(self, batch: dict, terms: dict, sums: dict[str, float]) -> None:
        values = batch["rewards"].float()  # (S, R)
        total = (values * self.weights.to(values.device)[None, :]).sum(1)
        parts = {"reward": total, **{k: values[:, j] for j, k in enumerate(self.keys)}}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
            sums[k + "_sq"] = sums.get(k + "_sq", 0.0) + float((v * v).sum())
        for k, v in (("completion_length", batch["completion_length"]),
                     ("truncated", batch["truncated"]), ("clipped", terms["clipped"]),
                     ("kl", terms.get("kl"))):
            if v is not None:
                sums[k] = sums.get(k, 0.0) + float(v.float().sum())

    def metrics(self, sums: dict[str, float], norms: list[int], dist: Dist,
                device: str) -> dict[str, float]:
        keys = sorted(sums)
        values = all_sum(dist, [sums[k] for k in keys], device) if dist.active else \
            [sums[k] for k in keys]
        s = dict(zip(keys, values))
        n_seq, n_tok = max(norms[0], 1), max(norms[1], 1)
        out = {}
        for k in ["reward", *self.keys]:
            mean = s[k] / n_seq
            out[k], out[k + "_std"] = mean, math.sqrt(max(s[k + "_sq"] / n_seq - mean * mean, 0))
        if self.first:
            self.first = False
            log.info("first step: rollouts %.1f s of it (the rest is the update)",
                     self.rollout_seconds)
        out.update(completion_length=s["completion_length"] / n_seq,
                   truncated_ratio=s["truncated"] / n_seq, clip_ratio=s["clipped"] / n_tok,
                   rollout_seconds=self.rollout_seconds)
        if "kl" in s:
            out["kl"] = s["kl"] / n_tok
        return out

    def evaluate(self, model, prompts, device: str, dtype: torch.dtype) -> dict[str, float]:
        """Mean rewards of greedy completions of the eval prompts (no loss: None)."""
        run = SimpleNamespace(model=model, tokenizer=self.tok, device=device, dtype=dtype)
        prompts, was = list(prompts), model.training
        model.eval()
        try:
            parts = []
            step = self.cfg.train.batch_size * self.g.num_generations
            for s in range(0, len(prompts), step):
                rows, outs, ids = self._sample(run, prompts[s:s + step], None)
                parts.append(self._score(rows, [o.text for o in outs], ids))
        finally:
            model.train(was)
        values = torch.cat(parts)  # (S, R)
        out = {"loss": None, "reward": float((values * self.weights).sum(1).mean())}
        out.update({k: float(values[:, j].mean()) for j, k in enumerate(self.keys)})
        return out

    # -- checkpoints ------------------------------------------------------------------------
    def state(self, dist: Dist) -> dict | None:
        """The rollouts in use, every rank's (called on all ranks: a collective under
        torchrun); None when the next step samples anew."""
        if self.gen is None or self.g.num_iterations == 1:
            return None
        mine = [_to_json({k: v for k, v in b.items() if k != "attention_mask"})
                for b in self.gen[1]]  # the mask is rebuilt from seq: (B, 1, T, T) is large
        ranks = gather_objects(dist, mine) if dist.active else [mine]
        return {"generation": self.gen[0], "ranks": ranks}

    def load_state(self, state: dict | None, dist: Dist) -> None:
        if state:
            self.gen = (state["generation"], [_with_mask(_from_json(b))
                                              for b in state["ranks"][dist.rank]])
