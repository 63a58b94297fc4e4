"""`adapters verify | pack | convert | push | pull`: sharing adapter files safely."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..adapter.archive import pack
from ..share.hub import pull, push
from ..share.verify import convert, verify
from .common import adapter_path, add_quantization_flag, existing_dir, repo_id


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=adapter_path,
                   help="an adapter folder or a .zip from `adapters pack`")
    p.add_argument("--base", help="also check the fingerprint against this base, load the "
                                  "adapter into it and run one forward pass")
    add_quantization_flag(p, help="how to load --base (default none)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")


def cmd_verify(args: argparse.Namespace) -> int:
    checks = verify(args.path, args.base, args.quantization)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    ok = all(c.ok for c in checks)
    print(f"{args.path}: " + ("verified" if ok else "NOT verified"), file=sys.stderr)
    return 0 if ok else 1


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
    p.add_argument("--base", help="fill in the base fingerprint from this model")


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


COMMANDS = {
    "verify": ("check an adapter folder or archive (hash, finite, shapes, no pickles; "
               "with --base: fingerprint, load, forward)", _add_verify, cmd_verify),
    "pack": ("zip an adapter folder into one file to send", _add_pack, cmd_pack),
    "convert": ("turn a pickle (adapter_model.bin) adapter into safetensors + manifest",
                _add_convert, cmd_convert),
    "push": ("upload an adapter folder to the model hub", _add_push, cmd_push),
    "pull": ("download an adapter from the model hub and verify it", _add_pull, cmd_pull),
}
