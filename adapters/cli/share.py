"""`adapters verify | pack | convert | push | pull`: sharing adapter files safely."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from ..adapter import read_base_name
from ..adapter.archive import pack
from ..model import load_tokenizer, resolve_model_path
from ..share.export import DEFAULT_MAX_KL, FORMATS, export
from ..share.gguf_io import OUT_TYPES
from ..share.hub import pull, push
from ..share.parity import RUNTIMES, certify, prompts_for, record
from ..share.targets import VLLM_DEFAULT_MAX_RANK, VLLM_RANKS, check_target
from ..share.verify import convert, verify
from .common import (
    adapter_path,
    add_base_flag,
    add_quantization_flag,
    existing_dir,
    existing_file,
    non_negative_float,
    positive_int,
    repo_id,
)


def _target(text: str) -> str:
    if text in ("vllm", "llama.cpp") or re.fullmatch(r"peft==\d+\.\d+(\.\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: choose vllm, llama.cpp or peft==X.Y")


def _vllm_rank(text: str) -> int:
    if text.isdigit() and int(text) in VLLM_RANKS:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: vLLM accepts {', '.join(map(str, VLLM_RANKS))}")


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=adapter_path,
                   help="an adapter folder or a .zip from `adapters pack`")
    add_base_flag(p, "also check the fingerprint against this base, load the adapter into "
                     "it and run one forward pass")
    add_quantization_flag(p, help="how to load --base (default none)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--target", type=_target, action="append", default=[],
                   help="also check against a runtime's limits: vllm, llama.cpp or peft==X.Y "
                        "(repeatable)")
    p.add_argument("--max-lora-rank", type=_vllm_rank, default=VLLM_DEFAULT_MAX_RANK,
                   help=f"the vLLM server's --max-lora-rank (default {VLLM_DEFAULT_MAX_RANK})")
    g = p.add_argument_group("parity certificate (--parity)")
    g.add_argument("--parity", action="store_true",
                   help="run the same prompts through every runtime installed here and compare "
                        "each with plain peft (top-1, KL, greedy agreement); the certificate "
                        "goes into the folder's manifest and model card")
    g.add_argument("--runtimes", type=_runtimes, default=RUNTIMES,
                   help=f"comma-separated, from {', '.join(RUNTIMES)} (default: all)")
    g.add_argument("--prompts", type=existing_file,
                   help="prompts, one per line (or JSONL with `prompt`); default: the adapter's "
                        "own eval split (from its manifest), else sample texts")
    g.add_argument("--data", type=existing_file,
                   help="an eval data file in the adapter's recipe format to take prompts from")
    g.add_argument("--num-prompts", type=positive_int, default=32, help="default 32")
    g.add_argument("--new-tokens", type=positive_int, default=64,
                   help="greedy continuation length (default 64)")
    g.add_argument("--no-write", action="store_true",
                   help="print the certificate only (a .zip is never written to)")


def _runtimes(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in names if x not in RUNTIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(RUNTIMES)}")
    return names


def _parity(args: argparse.Namespace) -> int:
    spec = args.base or read_base_name(args.path)
    if spec is None:
        raise SystemExit(f"{args.path}: its manifest names no base: pass --base")
    tok = load_tokenizer(resolve_model_path(spec))
    texts, source = prompts_for(args.path, tok, args.num_prompts, args.data, args.prompts)
    print(f"parity: {len(texts)} prompts from {source}", file=sys.stderr)
    info = certify(args.path, args.base, texts, args.new_tokens, args.runtimes)
    for r in info.rows:
        print(f"{'ok  ' if r.passed else 'FAIL'}  {r.runtime} ({r.version}, {r.precision}): "
              f"top-1 {r.top1:.1%}, KL {r.kl:.4f}, greedy {r.greedy:.0%}"
              + (f" [{r.threshold}]" if r.threshold else "") + (f": {r.note}" if r.note else ""))
    for name, why in info.skipped.items():
        print(f"skip  {name}: {why}")
    if not args.no_write and record(args.path, info):
        print(f"{args.path}: certificate written into manifest.json and README.md",
              file=sys.stderr)
    return 0 if info.passed else 1


def cmd_verify(args: argparse.Namespace) -> int:
    checks = verify(args.path, args.base, args.quantization)
    if all(c.ok for c in checks):
        for target in args.target:
            checks += check_target(args.path, target, args.max_lora_rank)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    ok = all(c.ok for c in checks)
    print(f"{args.path}: " + ("verified" if ok else "NOT verified"), file=sys.stderr)
    if ok and args.parity:
        return _parity(args)
    return 0 if ok else 1


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", type=adapter_path, help="an adapter folder or .zip")
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="gguf-lora: llama.cpp LoRA file; gguf: merged model file; ollama: "
                        "Modelfile folder; peft: config for an older peft")
    p.add_argument("--out", required=True, help="the file (gguf, gguf-lora) or folder to write")
    add_base_flag(p, "the base (default: the one the manifest names)")
    p.add_argument("--base-gguf", type=existing_file,
                   help="the base as a GGUF file (default: the embedded default's, or one "
                        "written from the HF folder)")
    p.add_argument("--outtype", default="f16", choices=tuple(OUT_TYPES),
                   help="--to gguf: tensor type of the merged matrices (default f16)")
    p.add_argument("--max-kl", type=non_negative_float, default=DEFAULT_MAX_KL,
                   help="fail when llama.cpp's mean KL from ours exceeds this "
                        f"(default {DEFAULT_MAX_KL})")
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the result in llama.cpp (without its runtime installed, "
                        "the file is written unchecked and the output says so)")
    p.add_argument("--peft-version", help="--to peft: the peft release that will load it, X.Y")
    p.add_argument("--name", help="--to ollama: the model name (default: the adapter's)")


def cmd_export(args: argparse.Namespace) -> int:
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file at INFO
    res = export(args.adapter, args.to, args.out, base=args.base, base_gguf=args.base_gguf,
                 out_type=args.outtype, verify=not args.no_verify, max_kl=args.max_kl,
                 peft_version=args.peft_version, name=args.name)
    for f in res.files:
        size = f" ({Path(f).stat().st_size / 1e6:.1f} MB)" if Path(f).is_file() else ""
        print(f"wrote {f}{size}")
    if res.report is not None:
        print("\n".join(res.report.lines()))
    elif args.to != "peft" and args.no_verify:
        print("not verified in llama.cpp (--no-verify)")
    for note in res.notes:
        print(note)
    if res.commands:
        print("run it:\n  " + "\n  ".join(res.commands))
    return 0


def _add_pack(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=existing_dir, help="an adapter folder")
    p.add_argument("-o", "--out", required=True, help="the archive to write, e.g. NAME.zip")


def cmd_pack(args: argparse.Namespace) -> int:
    out = pack(args.folder, args.out)
    print(f"{out} ({Path(out).stat().st_size} bytes): load it with --adapter NAME={out}")
    return 0


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=existing_dir,
                   help="a peft adapter folder with adapter_model.bin (or safetensors without "
                        "a manifest)")
    p.add_argument("--out", help="the new folder (default: FOLDER-safetensors)")
    add_base_flag(p, "fill in the base fingerprint from this model")


def cmd_convert(args: argparse.Namespace) -> int:
    out = convert(args.folder, args.out, args.base)
    print(f"{out}: safetensors adapter with manifest and card (the old folder is unchanged)")
    return 0


def _add_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=existing_dir, help="an adapter folder (verified before upload)")
    p.add_argument("repo_id", type=repo_id, help="owner/name on the hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--message", help="commit message")


def cmd_push(args: argparse.Namespace) -> int:
    print(push(args.folder, args.repo_id, private=args.private, message=args.message))
    return 0


def _add_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", type=repo_id, help="owner/name on the hub")
    p.add_argument("--out", help="folder to write (default: ./NAME)")
    p.add_argument("--revision", help="branch, tag or commit")


def cmd_pull(args: argparse.Namespace) -> int:
    out = pull(args.repo_id, args.out, args.revision)
    print(f"{out}: pulled and verified")
    return 0


# name -> (add its flags, run it); each one's help line is in the table of cli/__init__.py
COMMANDS = {
    "verify": (_add_verify, cmd_verify),
    "export": (_add_export, cmd_export),
    "pack": (_add_pack, cmd_pack),
    "convert": (_add_convert, cmd_convert),
    "push": (_add_push, cmd_push),
    "pull": (_add_pull, cmd_pull),
}
