"""`adapters train`: a recipe -> an adapter folder, on one process or several (torchrun)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..config import load_recipe
from ..data import check_data
from ..errors import ConfigError
from ..eval import evaluate
from ..eval.jobs_report import write_jobs_report
from ..recipe_jobs import JobSet, has_jobs, load_jobs, sweep_jobs
from ..training import Interrupted, train
from ..training.jobs import train_jobs
from .common import positive_int


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (with a jobs: list, several adapters on one "
                                   "base in one pass)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=10")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in the output folder, or PATH")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="pause after N steps of this run (checkpoint written; --resume goes on)")
    p.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                   help="data-parallel on N processes of this machine (runs torchrun "
                        "--standalone --nproc_per_node N; one per GPU, or gloo on CPU); "
                        "train.batch_size is per process")
    p.add_argument("--no-compare", action="store_true",
                   help="a recipe with jobs: skip the evaluation of every adapter on every "
                        "job's eval set at the end")


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.steps=9`: argparse took an override for the optional PATH.
        args.overrides.append(args.resume)
        args.resume = "latest"
    if Path(args.recipe).is_file() and has_jobs(args.recipe):
        if args.nproc and args.nproc > 1:
            raise ConfigError(f"{args.recipe}: a recipe with jobs trains on one process "
                              "(one base, stacked batches); drop --nproc")
        return run_jobs(load_jobs(args.recipe, args.overrides), args)
    cfg = load_recipe(args.recipe, args.overrides)
    check_data(cfg.data)  # a data mistake must not cost a model load (or N of them)
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, args.argv)
    try:
        out = train(cfg, resume=args.resume, progress=True, stop_after=args.stop_after)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    print(f"output folder: {out}")
    return 0


def _add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (without jobs:)")
    p.add_argument("overrides", nargs="+",
                   help="section.key=v1,v2,... sweeps that key (every combination of the axes "
                        "is a job); section.key=value without a comma applies to all")
    p.add_argument("--resume", action="store_const", const="latest", default=None,
                   help="continue every job from its newest checkpoint")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="pause after N steps (checkpoints written; --resume goes on)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the evaluation of every adapter on every job's eval set")


def cmd_sweep(args: argparse.Namespace) -> int:
    return run_jobs(sweep_jobs(args.recipe, args.overrides), args)


def run_jobs(js: JobSet, args: argparse.Namespace) -> int:
    """Train the jobs in one pass, then compare them: report.md in the pass's folder."""
    if args.resume not in (None, "latest"):
        raise ConfigError(f"--resume {args.resume}: the jobs of a pass resume together, each "
                          "from the newest checkpoint in its own folder: use --resume alone")
    for job in js.jobs:
        check_data(job.cfg.data)
    print(f"{len(js.jobs)} jobs on one base: {', '.join(j.name for j in js.jobs)}",
          file=sys.stderr)
    t0 = time.perf_counter()
    try:
        outs = train_jobs(js.jobs, resume=args.resume, progress=True,
                          stop_after=args.stop_after)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    seconds = time.perf_counter() - t0
    done = {j.name: (j, o) for j, o in zip(js.jobs, outs, strict=True)
            if (o / "adapter_model.safetensors").exists()}
    rows = None
    if done and not getattr(args, "no_compare", False) and not args.stop_after:
        cfg0 = js.jobs[0].cfg
        rows = evaluate(cfg0.model.name, {n: o for n, (_, o) in done.items()},
                        {n: j.cfg.data for n, (j, _) in done.items()},
                        cfg0.model.quantization, progress=sys.stderr.isatty(),
                        dtype=cfg0.model.dtype,
                        held_out={n: j.cfg.train.seed for n, (j, _) in done.items()})
    report = write_jobs_report(js.folder, [j.name for j in js.jobs], outs,
                               [j.cfg.to_dict() for j in js.jobs], rows, seconds)
    for job, out in zip(js.jobs, outs, strict=True):
        print(f"{job.name}: {out}" + ("" if job.name in done else " (not finished)"))
    print(f"report: {report}")
    return 0 if len(done) == len(js.jobs) or args.stop_after else 1


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command under torchrun (PyTorch's launcher) with `nproc` processes."""
    rest, skip = [], False
    for a in argv:  # the command line minus --nproc N
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "adapters", *rest]
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


# name -> (add its flags, run it); each one's help line is in the table of cli/__init__.py
COMMANDS = {
    "train": (_add_train, cmd_train),
    "sweep": (_add_sweep, cmd_sweep),
}
