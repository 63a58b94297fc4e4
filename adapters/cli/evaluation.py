"""`adapters eval`: the base and adapters side by side on the same data, every flag checked
before the base loads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..config import DataConfig, load_recipe
from ..data.sources import check_sources
from ..errors import ConfigError, DataError
from ..eval import HIGHER_IS_BETTER, compare, evaluate, table, write_results
from ..eval.heads import predict
from ..eval.record import record_eval
from ..eval.report import confusion_tables
from ..io import atomic_write_text
from .common import (
    adapter_path,
    add_adapter_flags,
    add_base_flags,
    add_data_flags,
    add_max_new_tokens_flag,
    base_of,
    data_config,
    data_source,
    existing_file,
    named_data,
    non_negative_int,
    positive_int,
    unique,
)

# columns kept whatever --metrics says
_ALWAYS = {"model", "dataset", "tokens", "samples", "examples", "confusion", "labels"}


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", type=existing_file,
                   help="evaluate on this recipe's data.eval with its data settings "
                        "(and its model as the default base)")
    add_base_flags(p)
    add_adapter_flags(p)
    p.add_argument("--data", action="append", default=[], type=named_data,
                   metavar="[NAME=]FILE", help="eval data; repeat for several datasets")
    add_data_flags(p)
    p.add_argument("--max-rows", type=positive_int,
                   help="at most this many examples per dataset")
    p.add_argument("--metrics", nargs="+", metavar="M", choices=list(HIGHER_IS_BETTER),
                   help=f"only these: {' '.join(HIGHER_IS_BETTER)} (default: all that apply)")
    p.add_argument("--generate", type=non_negative_int, default=0, metavar="N",
                   help="also answer the first N prompts greedily: exact match, token F1, "
                        "ROUGE-L, sample answers")
    add_max_new_tokens_flag(p)
    p.add_argument("--compare", type=existing_file, metavar="OLD/results.json",
                   help="print deltas against it")
    p.add_argument("--out", help="write results.json/.csv, eval.png and report.md here")


def _datasets(args: argparse.Namespace, adapters: dict[str, str]
              ) -> tuple[str, dict[str, DataConfig]]:
    """The base and the datasets to evaluate on, all checked; no file is read yet."""
    datasets: dict[str, DataConfig] = {}
    fallback = None
    if args.recipe:
        cfg = load_recipe(args.recipe)
        if cfg.data.eval is None:
            raise ConfigError(f"{args.recipe}: data.eval is not set; nothing to evaluate on")
        fallback = cfg.model.name
        datasets["eval"] = dataclasses.replace(cfg.data, train=cfg.data.eval, eval=None,
                                               eval_fraction=0.0)
        try:
            check_sources(cfg.data.eval)
        except DataError as e:
            raise DataError(f"{args.recipe}: data.eval: {e}") from None
    datasets.update({name: data_config(args, path)
                     for name, path in unique(args.data, "--data").items()})
    if not datasets:
        raise ConfigError("adapters eval needs --data (or --recipe with data.eval)")
    return base_of(args, adapters, fallback), datasets


def _read_results(path: str) -> list[dict]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--compare {path}: not a results.json from `adapters eval` "
                          f"({e})") from None


def cmd_eval(args: argparse.Namespace) -> int:
    adapters = unique(args.adapter, "--adapter")
    base, datasets = _datasets(args, adapters)
    old = _read_results(args.compare) if args.compare else None
    wanted = set(args.metrics or ["token_accuracy"])
    rows = evaluate(base, adapters, datasets, args.quantization, args.max_rows,
                    accuracy="token_accuracy" in wanted, progress=sys.stderr.isatty(),
                    generate=args.generate, max_new_tokens=args.max_new_tokens)
    keep = set(args.metrics or HIGHER_IS_BETTER) | _ALWAYS
    rows = [{k: v for k, v in r.items() if k in keep} for r in rows]
    for metric in HIGHER_IS_BETTER:
        if metric in rows[0]:
            print(table(rows, metric) + "\n")
    print("\n".join(confusion_tables(rows)), end="")  # classification heads only
    if old is not None:
        print(compare(rows, old))
    if args.out:
        write_results(rows, Path(args.out))
        print(f"results in {args.out}")
    for name, folder in adapters.items():
        if Path(folder).is_dir():  # the card in the adapter folder shows the results too
            record_eval(folder, name, rows)
    return 0


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", type=adapter_path, metavar="ADAPTER",
                   help="a classification or regression adapter (folder or .zip)")
    p.add_argument("--data", required=True, type=data_source, metavar="FILE",
                   help="rows with a text column (or --prompt-template over columns); a label "
                        "column is not needed")
    add_base_flags(p)
    add_data_flags(p)
    p.add_argument("--max-rows", type=positive_int, help="at most this many rows")
    p.add_argument("--out", help="write the predictions here as JSONL (default: stdout)")


def cmd_predict(args: argparse.Namespace) -> int:
    args.format = "label"  # the only format a head reads; --columns roles: text, label
    dcfg = data_config(args, args.data)
    preds = predict(args.adapter, dcfg, args.base, args.quantization, max_rows=args.max_rows)
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds)
    if args.out:
        atomic_write_text(Path(args.out), text)
        print(f"{len(preds)} predictions in {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# name -> (add its flags, run it); each one's help line is in the table of cli/__init__.py
COMMANDS = {
    "eval": (_add_eval, cmd_eval),
    "predict": (_add_predict, cmd_predict),
}
