"""Recipes with several jobs: many adapters on one base, trained in one pass (training/jobs.py).

A recipe may hold `jobs:`, a list of mappings. Each job overrides keys of `lora`, `data`,
`train` and `output` (nested, `{train: {lr: 1e-4}}`, or dotted, `{train.lr: 1e-4}`) and may
set a `name`; what it leaves out comes from the rest of the recipe. `adapters sweep` builds
the same list from a grid (`lora.r=8,16 train.lr=1e-4,3e-4`: four jobs).

What one shared base and one stacked forward fix must match across jobs (SHARED): the whole
`model` section, `data.max_seq_len`, and the speed switches of `train`. A job that sets one of
them to another value is an error naming the job and the key, before anything loads.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SECTIONS, RunConfig, field_default, finish_recipe, read_recipe
from .errors import ConfigError
from .safe_yaml import load_yaml

# section -> keys every job must share (None: the whole section)
SHARED: dict[str, tuple[str, ...] | None] = {
    "model": None,
    "data": ("max_seq_len",),
    "train": ("parallel", "gradient_checkpointing", "offload_checkpoints", "compile",
              "fused_lora", "attention", "liger", "dist_timeout_s", "jobs_per_forward"),
}
JOB_SECTIONS = ("lora", "data", "train", "output")
OBJECTIVES = ("sft", "dpo", "orpo")  # grpo rolls out per job; task heads change the base
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED = {"eval", "report.md", "losses.png"}  # what the pass writes beside the job folders


@dataclass
class Job:
    """One adapter of a multi-job pass: its name (the peft adapter name too) and recipe."""

    name: str
    cfg: RunConfig


@dataclass
class JobSet:
    """The jobs of one pass and its folder (the recipe's output.dir: each job's folder is in
    it unless the job names its own, and the pass's report.md is at its top)."""

    jobs: list[Job]
    folder: Path


def has_jobs(path: str | Path) -> bool:
    return "jobs" in read_recipe(path)


def load_jobs(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSet:
    """The jobs of a recipe with `jobs:` (overrides apply to every job), all checked at once."""
    raw = read_recipe(path, overrides)
    jobs = raw.pop("jobs", None)
    if not isinstance(jobs, list) or not jobs:
        raise ConfigError(f"{path}: jobs: expected a non-empty list of mappings, each with "
                          "the lora / data / train / output keys it changes")
    return build_jobs(raw, jobs, path)


def sweep_jobs(path: str | Path, overrides: list[str] | tuple[str, ...]) -> JobSet:
    """A grid: every override with a comma-separated value is an axis, e.g. lora.r=8,16,32."""
    fixed, axes = [], []
    for text in overrides:
        dotted, _, value = text.partition("=")
        if "," in value and not value.lstrip().startswith(("[", "{")):
            axes.append((dotted, [v.strip() for v in value.split(",")]))
        else:
            fixed.append(text)
    if not axes:
        raise ConfigError("sweep: no axis to sweep; give at least one key with several "
                          "values, e.g. lora.r=8,16,32")
    raw = read_recipe(path, fixed)
    if "jobs" in raw:
        raise ConfigError(f"{path}: has a jobs: list already; a sweep builds its own jobs")
    jobs = []
    for combo in itertools.product(*(values for _, values in axes)):
        name = "-".join(f"{key.rsplit('.', 1)[-1]}{value}" for (key, _), value in
                        zip(axes, combo, strict=True))
        job: dict[str, Any] = {"name": re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64]}
        for (key, _), value in zip(axes, combo, strict=True):
            job[key] = load_yaml(value, f"sweep value {key}={value}")
        jobs.append(job)
    return build_jobs(raw, jobs, path)


def build_jobs(raw: dict, jobs: list, path: str | Path) -> JobSet:
    """Each job's RunConfig from the shared raw recipe and its overrides; every problem of
    every job in one ConfigError."""
    out, errors, dirs = [], [], {}
    base_dir = (raw.get("output") or {}).get("dir", "runs/adapter")
    for i, job in enumerate(jobs):
        where = f"jobs[{i}]"
        if not isinstance(job, dict):
            errors.append(f"{where}: expected a mapping, got {type(job).__name__}")
            continue
        name = str(job.get("name", f"job{i}"))
        where = f"jobs[{i}] ({name})"
        if not NAME.fullmatch(name):
            errors.append(f"{where}: name must be letters, digits, '.', '_' or '-' (at most "
                          "64), starting with a letter or digit")
            continue
        merged, problems = _merge(raw, job, where)
        errors += problems
        if name in RESERVED:
            errors.append(f"{where}: the name {name!r} is the pass's own file or folder "
                          f"({', '.join(sorted(RESERVED))}); pick another")
            continue
        own = job.get("output")
        own_dir = (own.get("dir") if isinstance(own, dict) else None) or job.get("output.dir")
        # the recipe's output.dir holds the pass: each job's folder is inside it
        merged.setdefault("output", {})["dir"] = own_dir or str(Path(base_dir) / name)
        try:
            cfg = finish_recipe(merged, path, f"{path} {where}")
        except ConfigError as e:
            errors.append(str(e))
            continue
        errors += _check_job(cfg, where)
        if name in {j.name for j in out}:
            errors.append(f"{where}: the name {name!r} is taken by another job")
        mine = Path(cfg.output.dir).resolve()
        for other, who in dirs.items():
            if mine == other or mine.is_relative_to(other) or other.is_relative_to(mine):
                errors.append(f"{where}: output.dir {cfg.output.dir} is, holds or lies in "
                              f"{who}'s folder; each job needs a folder of its own")
        dirs[mine] = where
        out.append(Job(name, cfg))
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem(s) in the jobs:\n  " +
                          "\n  ".join(errors))
    return JobSet(out, Path(base_dir))


def _merge(raw: dict, job: dict, where: str) -> tuple[dict, list[str]]:
    """(the recipe with the job's keys put in, problems): only JOB_SECTIONS may change, and a
    shared key only to the value every job has."""
    merged, problems = copy.deepcopy(raw), []
    for key, value in job.items():
        if key == "name":
            continue
        section, body = (key, value) if "." not in key else (
            key.split(".", 1)[0], {key.split(".", 1)[1]: value})
        if section not in JOB_SECTIONS:
            why = ("every job trains on the same base" if section == "model"
                   else "not a section a job can change")
            problems.append(f"{where}: {section}: {why}; jobs may change "
                            f"{', '.join(JOB_SECTIONS)} (set {section} at the top)")
            continue
        if not isinstance(body, dict):
            problems.append(f"{where}: {section}: expected a mapping of its keys")
            continue
        for k, v in body.items():
            shared = SHARED.get(section) or ()
            top = (raw.get(section) or {}).get(k, _Unset)
            if top is _Unset and k in shared:
                top = field_default(SECTIONS[section], k)
            if k in shared and v != top:
                problems.append(
                    f"{where}: {section}.{k} is {v!r} here but {top!r} for the recipe: the "
                    f"jobs share one base and one stacked batch, so {section}.{k} must be "
                    "the same for all; set it at the top of the recipe")
                continue
            merged.setdefault(section, {})
            if isinstance(merged[section], dict):
                merged[section][k] = v
    return merged, problems


class _Unset:
    pass


def peft_name(job: str) -> str:
    """The job's adapter name inside peft: a module name (no ".") that is never part of
    "lora_", which peft's loading matches names against (a job called "a" would clash)."""
    return "job_" + job.replace(".", "_")


def check_jobs(jobs: list[Job]) -> None:
    """ConfigError unless the jobs' recipes agree on SHARED and each job can join a pass (for
    jobs built in code, e.g. the demo's; recipe jobs were checked when read)."""
    problems, first = [], jobs[0].cfg.to_dict()
    for i, job in enumerate(jobs):
        where, mine = f"jobs[{i}] ({job.name})", job.cfg.to_dict()
        for section, keys in SHARED.items():
            for k in keys or first[section]:
                if mine[section].get(k) != first[section].get(k):
                    problems.append(f"{where}: {section}.{k} is {mine[section].get(k)!r}, "
                                    f"{first[section].get(k)!r} in {jobs[0].name}: the jobs "
                                    "share one base and one stacked batch")
        problems += _check_job(job.cfg, where)
    if len({peft_name(j.name) for j in jobs}) < len(jobs):
        problems.append("two jobs have the same name (a '.' counts as '_')")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the jobs:\n  " + "\n  ".join(problems))


def _check_job(cfg: RunConfig, where: str) -> list[str]:
    problems = []
    if cfg.train.objective not in OBJECTIVES:
        problems.append(f"{where}: train.objective {cfg.train.objective!r}: jobs train "
                        f"{', '.join(OBJECTIVES)}; run {cfg.train.objective} on its own")
    if cfg.train.objective == "dpo" and cfg.train.dpo_reference != "cached":
        problems.append(f"{where}: train.dpo_reference in_step: jobs use the cached reference")
    if cfg.model.task != "causal_lm":
        problems.append(f"{where}: model.task {cfg.model.task}: a task head changes the base; "
                        "train it on its own")
    if cfg.model.dtype == "fp16":
        problems.append(f"{where}: model.dtype fp16: its loss scaling is per optimiser, and "
                        "the jobs share one backward; use bf16 or fp32")
    return problems
