"""Flags that several commands share, defined once, and the checks that run on them.

Every value is checked while the command line is parsed (argparse `type=` and `choices=`) or,
for checks across flags, at the top of the command: a mistake is a one-line
`error: adapters CMD: argument --FLAG: ...` and exit code 1, before any model loads.
Choices and defaults come from the recipe schema (`adapters.config`), so a flag and its
recipe key never disagree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..adapter import read_base_name
from ..adapter.archive import is_archive
from ..config import HUB_ID, QUANTIZATIONS, DataConfig, ModelConfig, field_choices, field_default
from ..data.formats import DEFAULT_COLUMNS
from ..data.sources import check_sources
from ..errors import AdaptersError, ConfigError

FORMATS = field_choices(DataConfig, "format")
DTYPES = tuple(d for d in field_choices(ModelConfig, "dtype") if d != "auto")  # stored dtypes


# ---- value types: each raises ArgumentTypeError, which argparse prefixes with the flag ----

def _number(text: str, kind: type, ok, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "an integer > 0")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def unit_interval(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def port(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v <= 65535, "a port 0-65535 (0: any free one)")


def device(text: str) -> str:
    try:  # any device torch knows (cpu, cuda:1, mps, xpu, ...); whether it is present is
        torch.device(text)  # checked when the model loads
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or "
                                         f"cuda:1, got {text!r}") from None
    return text


def repo_id(text: str) -> str:
    if not HUB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a hub id owner/name, got {text!r}")
    return text


def existing_file(text: str) -> str:
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def existing_dir(text: str) -> str:
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return text


def adapter_path(text: str) -> str:
    """An adapter folder, or a .zip archive from `adapters pack`."""
    p = Path(text).expanduser()
    if not (p.is_dir() or (p.is_file() and is_archive(p))):
        raise argparse.ArgumentTypeError(
            f"no adapter folder or .zip archive at {text}" if not p.exists()
            else f"{text} is neither a folder nor a .zip archive from `adapters pack`")
    return text


def data_source(text: str) -> str:
    """A data file, folder, glob or hub dataset id that can be read (offline: no hub id)."""
    try:
        check_sources(text)
    except AdaptersError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def split_pair(text: str, what: str = "NAME=VALUE") -> tuple[str, str]:
    """`NAME=VALUE` -> (NAME, VALUE), both stripped and non-empty."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return name.strip(), value.strip()


def adapter_pair(text: str) -> tuple[str, str]:
    """`NAME=PATH` with PATH an adapter folder or archive."""
    name, path = split_pair(text, "NAME=PATH")
    return name, adapter_path(path)


def named_data(text: str) -> tuple[str, str]:
    """`[NAME=]FILE`: a dataset for eval, named after the file when NAME is left out."""
    name, path = split_pair(text, "NAME=FILE") if "=" in text else (Path(text).stem, text)
    return name, data_source(path)


def parse_pairs(text: str) -> dict[str, str]:
    """`a=b,c=d` -> {a: b, c: d} (the --columns mapping)."""
    return dict(split_pair(part, "ROLE=COLUMN") for part in text.split(","))


def unique(pairs: list[tuple[str, str]], flag: str) -> dict[str, str]:
    """NAME=VALUE pairs as a dict; a name given twice is an error, not a silent overwrite."""
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            raise ConfigError(f"{flag}: the name {name!r} is given twice; names must differ")
        out[name] = value
    return out


# ---- flag groups ----

def add_base_flags(p: argparse.ArgumentParser, what: str = "base model") -> None:
    """--base and --quantization: which base model and how to load it."""
    add_base_flag(p, f"{what}: hub id, folder or `default` (default: the first adapter's "
                     "manifest base)")
    add_quantization_flag(p)


def add_base_flag(p: argparse.ArgumentParser, help: str) -> None:
    """--base: a hub id, a folder or `default`; `help` says what it is for in this command."""
    p.add_argument("--base", metavar="BASE", help=help)


def add_max_new_tokens_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="the most tokens to generate per answer (default 64)")


def add_quantization_flag(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--quantization", choices=QUANTIZATIONS,
                   default=field_default(ModelConfig, "quantization"),
                   help=help or "load the base in 8-bit or 4-bit (default none)")


def add_adapter_flags(p: argparse.ArgumentParser) -> None:
    """--adapter NAME=PATH, repeatable; every PATH is checked to exist."""
    p.add_argument("--adapter", action="append", default=[], type=adapter_pair,
                   metavar="NAME=PATH",
                   help="an adapter folder (or .zip from `adapters pack`); repeat for more")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """How to read data files: --format, --columns, --prompt-template, --max-seq-len."""
    p.add_argument("--format", choices=FORMATS, default=field_default(DataConfig, "format"))
    p.add_argument("--columns", type=parse_pairs, metavar="ROLE=COLUMN,...",
                   help="e.g. prompt=question,completion=answer")
    p.add_argument("--prompt-template", help='e.g. "Question: {prompt}\\nAnswer: "')
    p.add_argument("--max-seq-len", type=positive_int,
                   default=field_default(DataConfig, "max_seq_len"))


def data_config(args: argparse.Namespace, spec: str) -> DataConfig:
    """A DataConfig for `spec` from the data flags; --columns roles checked against --format."""
    roles = DEFAULT_COLUMNS[args.format]
    unknown = sorted(set(args.columns or {}) - set(roles))
    if unknown:
        raise ConfigError(f"--columns: {unknown} mean nothing for --format {args.format}; "
                          f"its roles are {', '.join(roles)}")
    return DataConfig(train=spec, format=args.format, columns=args.columns,
                      prompt_template=args.prompt_template, max_seq_len=args.max_seq_len)


def base_of(args: argparse.Namespace, adapters: dict[str, str], fallback: str | None = None
            ) -> str:
    """--base, else the first adapter's manifest base, else `fallback`; an error if none."""
    base = args.base or (read_base_name(next(iter(adapters.values()))) if adapters else None)
    base = base or fallback
    if not base:
        raise ConfigError("--base is needed (or an --adapter whose manifest names its base)")
    return base
