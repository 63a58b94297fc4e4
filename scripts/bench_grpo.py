#!/usr/bin/env python
"""Benchmark: GRPO's rollouts and memory on the embedded default (SmolLM2-135M, or --base).

rollouts  The same prompts, each sampled --generations times, --new tokens per completion (EOS
          ignored on both sides, so every row makes --new tokens), one batch of all rows, the
          same LoRA adapter (r=16 on every projection, random non-zero B), bf16 autocast on
          CPU, no grad:
            ours  the generation loop GRPO samples with (generation/decode.py: per-row seeded
                  samplers, temperature 1, top-p 1) on the peft model, adapter on
            hf    `model.generate(do_sample=True, temperature=1.0, top_p=1.0,
                  num_return_sequences=G, min_new_tokens=max_new_tokens=--new)` on the same
                  peft model: what TRL runs without vLLM
          interleaved, the order alternating each round (--repeat rounds); tokens/s = generated
          tokens / wall seconds; min / median / max per side and the ratio of medians.
          Target: ours >= 3x hf.
memory    Peak resident memory (ru_maxrss) of one process training --steps steps on the default
          model, 4-bit, each side in a fresh process, run one after the other, the same rows:
            sft   train.batch_size = prompts x generations rows of the pydoc-qa prompts, each
                  answer cut or repeated to --new tokens (what a GRPO completion that runs to
                  the length is), unpacked
            grpo  train.batch_size = prompts, grpo.num_generations = generations, beta 0.04
                  (the reference is the adapter-off base: no second model), unpacked
          Target: grpo <= 1.2x sft.

  .venv/bin/python scripts/bench_grpo.py --out runs/bench-grpo
  .venv/bin/python scripts/bench_grpo.py --repeat 1 --new 4 --steps 1 --out runs/bench-smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["Question: What does os.path.join do?\nAnswer: ",
           "Question: What does json.dumps return?\nAnswer: ",
           "Question: What does shutil.copy do?\nAnswer: ",
           "Question: What does textwrap.dedent do?\nAnswer: "]


def _model(base: str):
    import torch

    from adapters.config import LoraConfig, ModelConfig
    from adapters.lora import attach_lora
    from adapters.model import load_base

    model, tok = load_base(ModelConfig(name=base, dtype="bf16"))
    model = attach_lora(model, LoraConfig(r=16, alpha=32))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)  # a trained-looking adapter: it changes the output
    return model.eval(), tok


def _ours(model, tok, ids: list[list[int]], g: int, new: int) -> float:
    import torch

    from adapters.generation.decode import Request, Sampling, decode
    reqs = [Request(p, None, Sampling(max_new_tokens=new, temperature=1.0, seed=i * g + j,
                                      ignore_eos=True)) for i, p in enumerate(ids)
            for j in range(g)]
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = decode(model, tok, reqs, peft=False)
    dt = time.perf_counter() - t0
    assert all(len(o.token_ids) == new for o in outs)
    return len(reqs) * new / dt


def _hf(model, tok, ids: list[list[int]], g: int, new: int) -> float:
    import torch

    width = max(len(p) for p in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    x = torch.tensor([[pad] * (width - len(p)) + p for p in ids])  # left-padded, as ours
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(input_ids=x, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, num_return_sequences=g, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=pad)
    dt = time.perf_counter() - t0
    assert out.shape == (len(ids) * g, width + new)
    return len(ids) * g * new / dt


def rollouts(args) -> dict:
    model, tok = _model(args.base)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:args.prompts]]
    sides = {"ours": _ours, "hf": _hf}
    for fn in sides.values():  # warm-up: first calls pay for allocation and dispatch
        fn(model, tok, ids, args.generations, 2)
    got = {name: [] for name in sides}
    for r in range(args.repeat):
        for name in (sides if r % 2 == 0 else reversed(list(sides))):
            got[name].append(sides[name](model, tok, ids, args.generations, args.new))
            print(f"  round {r + 1} {name}: {got[name][-1]:.1f} tokens/s", flush=True)
    out = {name: {"min": min(v), "median": statistics.median(v), "max": max(v)}
           for name, v in got.items()}
    out["ratio_of_medians"] = out["ours"]["median"] / out["hf"]["median"]
    return out


def _peak(side: str, args) -> float:
    """Peak RSS (GB) of a fresh process training `side` for --steps steps."""
    cmd = [sys.executable, __file__, "--child", side, "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--generations", str(args.generations),
           "--new", str(args.new), "--base", args.base, "--out", str(args.out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_gb"]


def _fixed_length(path: Path, args) -> Path:
    """The CSV with each answer cut or repeated to --new tokens of the base's tokenizer."""
    import csv

    from adapters.model import load_tokenizer, resolve_model_path
    tok = load_tokenizer(resolve_model_path(args.base))
    out = args.out / "sft-fixed.csv"
    with open(path, newline="") as f, open(out, "w", newline="") as g:
        rows = list(csv.DictReader(f))
        w = csv.DictWriter(g, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            ids = tok(r["output"], add_special_tokens=False)["input_ids"] or [0]
            r["output"] = tok.decode((ids * (args.new // len(ids) + 1))[:args.new - 1])
            w.writerow(r)  # + EOS: --new tokens, as a completion cut at the length
    return out


def child(args) -> None:
    from adapters.config import load_recipe
    from adapters.demo.datasets import build_pydoc_qa
    from adapters.training import train

    data = build_pydoc_qa(args.out / "data", max_rows=64)
    rows = args.prompts * args.generations
    if args.child == "sft":  # answers of exactly --new tokens: the rows GRPO trains on
        data = {"train": _fixed_length(data["train"], args)}
    over = [f"model.name={args.base}", "model.quantization=4bit", f"data.train={data['train']}",
            "data.max_seq_len=256", f"train.steps={args.steps}", "lora.r=16",
            f"output.dir={args.out / args.child}", "data.packing=false",
            'data.prompt_template="Question: {prompt}\nAnswer: "']
    if args.child == "sft":
        over += [f"train.batch_size={rows}"]
    else:
        over += [f"train.batch_size={args.prompts}", "train.objective=grpo",
                 f"grpo.num_generations={args.generations}", "grpo.beta=0.04",
                 f"grpo.max_completion_length={args.new}", "grpo.rewards=[token_f1]"]
    shutil.rmtree(args.out / args.child, ignore_errors=True)  # a fresh run each time
    train(load_recipe(None, over))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps({"peak_gb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--new", type=int, default=48, help="tokens per completion")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per memory side")
    ap.add_argument("--only", choices=["rollouts", "memory"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-grpo"))
    ap.add_argument("--child", choices=["sft", "grpo"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"GRPO bench: {args.prompts} prompts x {args.generations} completions x {args.new} "
          f"tokens, base {args.base}, bf16 autocast, EOS ignored on both sides; {args.repeat} "
          "interleaved rounds; min / median / max, ratios of medians", flush=True)
    result = {}
    if args.only in (None, "rollouts"):
        result["rollouts"] = rollouts(args)
        r = result["rollouts"]
        print(f"rollouts tokens/s  ours {r['ours']['min']:.1f} / {r['ours']['median']:.1f} / "
              f"{r['ours']['max']:.1f}   hf generate {r['hf']['min']:.1f} / "
              f"{r['hf']['median']:.1f} / {r['hf']['max']:.1f}   ours/hf "
              f"{r['ratio_of_medians']:.2f}x (target >= 3x: "
              f"{'met' if r['ratio_of_medians'] >= 3 else 'missed'})")
    if args.only in (None, "memory"):
        sft, grpo = _peak("sft", args), _peak("grpo", args)
        result["memory"] = {"sft_gb": sft, "grpo_gb": grpo, "ratio": grpo / sft}
        print(f"peak memory  sft {sft:.2f} GB   grpo (beta 0.04) {grpo:.2f} GB   grpo/sft "
              f"{grpo / sft:.2f}x (target <= 1.2x: {'met' if grpo / sft <= 1.2 else 'missed'})")
    (args.out / "bench_grpo.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
