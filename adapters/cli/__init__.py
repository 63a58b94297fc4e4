"""The `adapters` command line: one flat table of subcommands -> functions.

The CLI owns the console (progress bars, tables); the library only logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from ..errors import AdaptersError
from .infer import COMMANDS as INFER_COMMANDS
from .share import COMMANDS as SHARE_COMMANDS

log = logging.getLogger("adapters")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=10")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in the output folder, or PATH")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="pause after N steps of this run (checkpoint written; --resume goes on)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="data-parallel on N processes of this machine (runs torchrun "
                        "--standalone --nproc_per_node N; one per GPU, or gloo on CPU); "
                        "train.batch_size is per process")


def cmd_train(args) -> int:
    from pathlib import Path

    from ..config import load_recipe
    from ..train.loop import Interrupted
    from ..train.trainer import train

    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, args.argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.steps=9`: argparse took an override for the optional PATH.
        args.overrides.append(args.resume)
        args.resume = "latest"
    cfg = load_recipe(args.recipe, args.overrides)
    try:
        out = train(cfg, resume=args.resume, progress=True, stop_after=args.stop_after)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    print(f"output folder: {out}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command under torchrun (PyTorch's launcher) with `nproc` processes."""
    import subprocess

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


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="evaluate on this recipe's data.eval with its data settings "
                                    "(and its model as the default base)")
    p.add_argument("--base", help="base model (default: the first adapter's manifest base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--data", action="append", default=[], metavar="[NAME=]FILE",
                   help="eval data; repeat for several datasets")
    p.add_argument("--format", default="prompt_completion",
                   choices=["text", "prompt_completion", "chat", "alpaca", "sharegpt"])
    p.add_argument("--columns", help="role=column,... e.g. prompt=question,completion=answer")
    p.add_argument("--prompt-template")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--max-rows", type=int, help="at most this many examples per dataset")
    p.add_argument("--quantization", choices=["none", "8bit", "4bit"], default="none")
    p.add_argument("--metrics", nargs="+", metavar="M",
                   help="only these: loss perplexity token_accuracy choice_accuracy exact_match "
                        "token_f1 rouge_l bleu (default: all that apply)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also answer the first N prompts greedily: exact match, token F1, "
                        "ROUGE-L, sample answers")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compare", metavar="OLD/results.json", help="print deltas against it")
    p.add_argument("--out", help="write results.json/.csv, eval.png and report.md here")


def cmd_eval(args) -> int:
    from pathlib import Path

    from ..config import DataConfig
    from ..errors import ConfigError
    from ..eval import compare, evaluate, table, write_results
    from ..merge import read_base_name

    adapters = dict(_pair(a, "--adapter") for a in args.adapter)
    base = args.base or (read_base_name(next(iter(adapters.values()))) if adapters else None)
    datasets = {}
    if args.recipe:
        import dataclasses

        from ..config import load_recipe

        cfg = load_recipe(args.recipe)
        if cfg.data.eval is None:
            raise ConfigError(f"{args.recipe}: data.eval is not set; nothing to evaluate on")
        base = args.base or base or cfg.model.name
        datasets["eval"] = dataclasses.replace(cfg.data, train=cfg.data.eval, eval=None,
                                               eval_fraction=0.0)
    if not base or not (args.data or datasets):
        raise ConfigError("adapters eval needs --data and --base (or an --adapter whose "
                          "manifest names its base)")
    columns = dict(_pair(c, "--columns") for c in args.columns.split(",")) if args.columns \
        else None
    for d in args.data:
        name, path = _pair(d, "--data") if "=" in d else (Path(d).stem, d)
        datasets[name] = DataConfig(train=path, format=args.format, columns=columns,
                                    prompt_template=args.prompt_template,
                                    max_seq_len=args.max_seq_len)
    wanted = set(args.metrics or ["token_accuracy"])
    rows = evaluate(base, adapters, datasets, args.quantization, args.max_rows,
                    accuracy="token_accuracy" in wanted,
                    progress=sys.stderr.isatty(), generate=args.generate,
                    max_new_tokens=args.max_new_tokens)
    from ..eval import HIGHER_IS_BETTER

    unknown = set(args.metrics or []) - set(HIGHER_IS_BETTER)
    if unknown:
        raise ConfigError(f"--metrics: unknown {sorted(unknown)}; choose from "
                          f"{', '.join(HIGHER_IS_BETTER)}")
    keep = set(args.metrics or HIGHER_IS_BETTER) | {"model", "dataset", "tokens", "samples"}
    rows = [{k: v for k, v in r.items() if k in keep} for r in rows]
    for metric in HIGHER_IS_BETTER:
        if metric in rows[0]:
            print(table(rows, metric) + "\n")
    if args.compare:
        import json

        print(compare(rows, json.loads(Path(args.compare).read_text())))
    if args.out:
        write_results(rows, Path(args.out))
        print(f"results in {args.out}")
    from ..eval import record_eval

    for name, folder in adapters.items():
        if Path(folder).is_dir():  # the card in the adapter folder shows the results too
            record_eval(folder, name, rows)
    return 0


def _pair(text: str, flag: str) -> tuple[str, str]:
    from ..errors import ConfigError

    if "=" not in text:
        raise ConfigError(f"{flag} {text!r}: expected NAME=VALUE")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def _add_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder (or .zip from `adapters pack`)")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--base", help="base model (default: the one in the adapter's manifest)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    p.add_argument("--against", choices=["dequantized", "original"], default="dequantized",
                   help="for adapters trained on a 4/8-bit base: merge into the dequantized "
                        "weights training saw (default) or the original full-precision ones")
    p.add_argument("--data", help="held-out text for the check (.txt/.csv/.jsonl; the first "
                                  "column or 'text')")
    p.add_argument("--max-kl", type=float, default=0.05,
                   help="fail above this mean KL(base+adapter || merged) (default 0.05)")
    p.add_argument("--stream", action="store_true",
                   help="merge tensor by tensor from the base's safetensors (low memory)")
    p.add_argument("--no-verify", action="store_true", help="skip the check")


def cmd_merge(args) -> int:
    from ..merge import merge_adapter, merge_streaming_verified

    data = _read_texts(args.data) if args.data else None
    if args.stream:
        out, result = merge_streaming_verified(args.adapter, args.out, args.base,
                                               not args.no_verify, data, args.max_kl)
    else:
        out, result = merge_adapter(args.adapter, args.out, args.base, args.dtype,
                                    args.against, not args.no_verify, data, args.max_kl)
    if result is not None:
        print(f"verified: max logit difference {result.max_logit_diff:.3g}, mean KL "
              f"{result.mean_kl:.3g}, perplexity base+adapter {result.ppl_reference:.3f} vs "
              f"merged {result.ppl_merged:.3f}")
    print(f"merged model written to {out}")
    return 0


def _read_texts(path: str) -> list[str]:
    from ..data.sources import read_rows

    rows, _ = read_rows(path)
    return [str(r.data.get("text") or next(iter(r.data.values()))) for r in rows][:64]


def _add_combine(p: argparse.ArgumentParser) -> None:
    from ..combine import METHODS

    p.add_argument("adapters", nargs="+", help="adapter folders or .zip archives (same base)")
    p.add_argument("--weights", nargs="+", type=float, required=True)
    p.add_argument("--method", choices=METHODS, default="linear")
    p.add_argument("--density", type=float, default=0.5, help="for ties / dare_*")
    p.add_argument("--out", required=True)


def cmd_combine(args) -> int:
    from ..combine import combine

    print(f"combined adapter written to "
          f"{combine(args.adapters, args.weights, args.out, args.method, args.density)}")
    return 0


def _add_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    pv = sub.add_parser("preview", help="show examples as the model sees them, loss tokens marked")
    pv.add_argument("recipe")
    pv.add_argument("overrides", nargs="*", help="section.key=value")
    pv.add_argument("--n", type=int, default=3, help="how many examples to show (default 3)")
    pv.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    bd = sub.add_parser("build", help="write the stdlib datasets (pydoc-qa CSV, stdlib-code "
                                      "JSONL), split by module")
    bd.add_argument("--out", default="runs/demo/data")


def cmd_data(args) -> int:
    from pathlib import Path

    from ..config import load_recipe
    from ..data.preview import preview

    if args.action == "build":
        from ..demo.datasets import build_pydoc_qa, build_stdlib_code

        for name, files in (("pydoc-qa", build_pydoc_qa(Path(args.out) / "pydoc-qa")),
                            ("stdlib-code", build_stdlib_code(Path(args.out) / "stdlib-code"))):
            print(f"{name}: {files['train']} and {files['eval']}")
        return 0
    cfg = load_recipe(args.recipe, args.overrides)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(preview(cfg, n=args.n, color=color))
    return 0


def _add_models(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("default", help="print the cached folder of the embedded default model "
                                   "(SmolLM2-135M-Instruct), converting it on first use")


def cmd_models(args) -> int:
    from ..model import default_model_dir

    logging.getLogger("adapters").setLevel(logging.INFO)
    print(default_model_dir(progress=True))
    return 0


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="adapter folder (or .zip from `adapters pack`)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_inspect(args) -> int:
    from ..adapter import inspect_adapter

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
    p.add_argument("--steps", type=int, help="training steps per adapter (default: recipes)")
    p.add_argument("--eval-rows", type=int, help="held-out examples per dataset")


def cmd_demo(args) -> int:
    from ..demo import run_demo

    report = run_demo(args.out, tiny=args.tiny, fresh=args.fresh, steps=args.steps,
                      eval_rows=args.eval_rows, progress=sys.stderr.isatty())
    print(report.read_text())
    print(f"report: {report}")
    return 0


# name -> (help, add-arguments, run)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("train a LoRA adapter from a recipe", _add_train, cmd_train),
    "eval": ("evaluate the base and adapters side by side", _add_eval, cmd_eval),
    "merge": ("merge an adapter into its base model, verified", _add_merge, cmd_merge),
    "combine": ("combine adapters of one base into a new adapter", _add_combine, cmd_combine),
    **INFER_COMMANDS,
    "inspect": ("show an adapter folder's base, settings, size and integrity", _add_inspect,
                cmd_inspect),
    **SHARE_COMMANDS,
    "data": ("data tools: `data preview RECIPE`, `data build`", _add_data, cmd_data),
    "demo": ("the main job on the embedded default model", _add_demo, cmd_demo),
    "models": ("model tools: `models default`", _add_models, cmd_models),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapters", description="Train, evaluate, merge, swap and share LoRA adapters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _quiet_third_party() -> None:
    """Hide library chatter that is no news to a user (deprecations, optional kernels)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    for name in ("bitsandbytes", "httpx", "matplotlib", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not args.verbose:
        _quiet_third_party()
    try:
        return COMMANDS[args.command][2](args)
    except AdaptersError as e:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"error: {rank}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
