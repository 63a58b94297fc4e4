"""The `adapters` command line: one flat table of subcommands -> functions.

Each command module (training, evaluation, merging, infer, share, tools) defines its flags
and its function; flags that several share are defined once in common.py. Every value is
checked while the command line is parsed or at the top of the command, before a model loads.
The CLI owns the console (progress bars, tables); the library only logs.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

from ..errors import AdaptersError
from .common import Parser
from .evaluation import COMMANDS as EVAL_COMMANDS
from .infer import COMMANDS as INFER_COMMANDS
from .merging import COMMANDS as MERGE_COMMANDS
from .share import COMMANDS as SHARE_COMMANDS
from .tools import COMMANDS as TOOL_COMMANDS
from .training import COMMANDS as TRAIN_COMMANDS
from .ui import COMMANDS as UI_COMMANDS

# name -> (help, add-arguments, run), in the order `adapters --help` lists them
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    **TRAIN_COMMANDS, **EVAL_COMMANDS, **MERGE_COMMANDS, **INFER_COMMANDS, **SHARE_COMMANDS,
    **TOOL_COMMANDS,
    **UI_COMMANDS,
}


def build_parser() -> Parser:
    parser = Parser(prog="adapters",
                    description="Train, evaluate, merge, swap and share LoRA adapters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
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
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help printed its text; parse errors raise ConfigError instead
        return int(e.code or 0)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not args.verbose:
        _quiet_third_party()
    return COMMANDS[args.command][2](args)


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
