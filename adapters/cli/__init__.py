"""The `adapters` command line: one flat table of subcommands -> their modules.

Each command module (training, evaluation, merging, infer, share, tools, ui) defines its flags
and its function, and is imported only for its own command; flags that several share are
defined once in common.py. Every value is checked while the command line is parsed or at the
top of the command, before a model loads.
The CLI owns the console (progress bars, tables); the library only logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable

from ..errors import AdaptersError, ConfigError

# name -> (the module of this package that defines it, its help line), in the order
# `adapters --help` lists them. A command's module, and what it needs (torch, transformers,
# peft), is imported only when that command runs or shows its own --help: `adapters --help`
# and a mistyped command answer at once.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training", "train a LoRA adapter from a recipe (several at once: jobs:)"),
    "sweep": ("training", "train a grid of adapters on one base in one pass, e.g. "
                          "lora.r=8,16 train.lr=1e-4,3e-4, and compare them"),
    "eval": ("evaluation", "evaluate the base and adapters side by side"),
    "predict": ("evaluation", "predict labels or values with a task-head adapter"),
    "merge": ("merging", "merge an adapter into its base model, verified"),
    "combine": ("merging", "combine adapters of one base into a new adapter"),
    "generate": ("infer", "answer a prompt with each adapter (and the base), side by side"),
    "serve": ("infer", "OpenAI-compatible HTTP server over the base and adapters"),
    "verify": ("share", "check an adapter folder or archive (hash, finite, shapes, no pickles; "
                        "with --base: fingerprint, load, forward)"),
    "export": ("share", "write an adapter for llama.cpp / Ollama (GGUF, checked in llama.cpp) "
                        "or an older peft"),
    "pack": ("share", "zip an adapter folder into one file to send"),
    "convert": ("share", "turn a pickle (adapter_model.bin) adapter into safetensors + manifest"),
    "push": ("share", "upload an adapter folder to the model hub"),
    "pull": ("share", "download an adapter from the model hub and verify it"),
    "inspect": ("tools", "show an adapter folder's base, settings, size and integrity"),
    "data": ("tools", "data tools: `data preview RECIPE`, `data build`"),
    "demo": ("tools", "the main job on the embedded default model"),
    "models": ("tools", "model tools: `models default`"),
    "ui": ("ui", "the web page over a folder of training runs (live loss curves, summaries, "
                 "eval reports), without a model"),
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 1, like every other error."""

    def error(self, message: str):  # argparse's default prints the usage and exits with 2
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def command(name: str) -> tuple[Callable, Callable]:
    """(add its flags, run it) for command `name`, importing its module."""
    return importlib.import_module(f".{COMMANDS[name][0]}", __name__).COMMANDS[name]


def build_parser(argv: list[str] | None = None) -> Parser:
    """The parser, with the flags of the command `argv` names (the first word that is one)."""
    chosen = next((a for a in argv or () if a in COMMANDS), None)
    parser = Parser(prog="adapters",
                    description="Train, evaluate, merge, swap and share LoRA adapters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            command(name)[0](p)
    return parser


def _quiet_third_party() -> None:
    """Hide library chatter that is no news to a user (deprecations, optional kernels)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    for name in ("bitsandbytes", "httpx", "matplotlib", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _run(argv: list[str]) -> int:
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as e:  # --help printed its text; parse errors raise ConfigError instead
        return int(e.code or 0)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not args.verbose:
        _quiet_third_party()
    return command(args.command)[1](args)


def main(argv: list[str] | None = None) -> int:
    """Run `adapters ARGV...`; returns the exit code (1 for any error this package raises)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except AdaptersError as e:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"error: {rank}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
