"""`adapters data | models | inspect | demo`: look at data and adapters, and the demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..adapter import inspect_adapter
from ..config import load_recipe
from ..data import check_data
from ..data.preview import preview
from ..demo import run_demo
from ..demo.datasets import build_pydoc_qa, build_stdlib_code
from ..model import default_model_dir
from ..training.heads import targets_for
from .common import adapter_path, positive_int


def _add_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    pv = sub.add_parser("preview", help="show examples as the model sees them, loss tokens marked")
    pv.add_argument("recipe")
    pv.add_argument("overrides", nargs="*", help="section.key=value")
    pv.add_argument("--n", type=positive_int, default=3,
                    help="how many examples to show (default 3)")
    pv.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    bd = sub.add_parser("build", help="write the stdlib datasets (pydoc-qa CSV, stdlib-code "
                                      "JSONL), split by module")
    bd.add_argument("--out", default="runs/demo/data")


def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "build":
        for name, files in (("pydoc-qa", build_pydoc_qa(Path(args.out) / "pydoc-qa")),
                            ("stdlib-code", build_stdlib_code(Path(args.out) / "stdlib-code"))):
            print(f"{name}: {files['train']} and {files['eval']}")
        return 0
    cfg = load_recipe(args.recipe, args.overrides)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    check_data(cfg.data)  # a missing file is named before the label column is read
    # the class names (and the task/format checks) exactly as `adapters train` makes them
    print(preview(cfg, n=args.n, color=color, targets=targets_for(cfg)))
    return 0


def _add_models(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("default", help="print the cached folder of the embedded default model "
                                   "(SmolLM2-135M-Instruct), converting it on first use")


def cmd_models(args: argparse.Namespace) -> int:
    logging.getLogger("adapters").setLevel(logging.INFO)
    print(default_model_dir(progress=True))
    return 0


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=adapter_path,
                   help="adapter folder (or .zip from `adapters pack`)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.folder)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            print(f"{key:>13}: {value}")
    return 0 if info["integrity"].startswith("ok") else 1


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random model and a few steps: checks the pipeline in a minute")
    p.add_argument("--fresh", action="store_true", help="redo every step, even finished ones")
    p.add_argument("--steps", type=positive_int,
                   help="training steps per adapter (default: recipes)")
    p.add_argument("--eval-rows", type=positive_int, help="held-out examples per dataset")


def cmd_demo(args: argparse.Namespace) -> int:
    report = run_demo(args.out, tiny=args.tiny, fresh=args.fresh, steps=args.steps,
                      eval_rows=args.eval_rows, progress=sys.stderr.isatty())
    print(report.read_text())
    print(f"report: {report}")
    return 0


# name -> (add its flags, run it); each one's help line is in the table of cli/__init__.py
COMMANDS = {
    "inspect": (_add_inspect, cmd_inspect),
    "data": (_add_data, cmd_data),
    "demo": (_add_demo, cmd_demo),
    "models": (_add_models, cmd_models),
}
