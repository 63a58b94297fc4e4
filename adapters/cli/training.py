"""`adapters train`: a recipe -> an adapter folder, on one process or several (torchrun)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..config import load_recipe
from ..data import check_data
from ..training import Interrupted, train
from .common import positive_int


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=10")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in the output folder, or PATH")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="pause after N steps of this run (checkpoint written; --resume goes on)")
    p.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                   help="data-parallel on N processes of this machine (runs torchrun "
                        "--standalone --nproc_per_node N; one per GPU, or gloo on CPU); "
                        "train.batch_size is per process")


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.steps=9`: argparse took an override for the optional PATH.
        args.overrides.append(args.resume)
        args.resume = "latest"
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
}
