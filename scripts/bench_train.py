#!/usr/bin/env python
"""Benchmark: `adapters train` against the HF Trainer + peft baseline, same everything.

Each run is its own subprocess (clean peak RSS; peak GPU memory on CUDA): identical model,
tokens, LoRA settings (r=16, every attention and MLP projection), batch, sequence length,
learning rate and steps.
Cases:
  a-256, a-1024  fixed-length text: stdlib source in windows of 256 / 1024 tokens, bf16
  b-padded       variable-length pydoc Q&A, baseline with its padding collator
  b-flat         the same, baseline with HF's padding-free DataCollatorWithFlattening
  c-qlora        4-bit nf4 base with bf16 compute (peak memory is the figure here)
Prints a table and writes Markdown + JSON (ratios are ours / baseline, measured in this run).

  .venv/bin/python scripts/bench_train.py --quick          # < 10 min on 2 cores
  .venv/bin/python scripts/bench_train.py --models smollm2 gpt2-small --steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name -> (dataset, seq_len, batch, quantization, baseline collator)
    "a-256": ("code", 256, 4, "none", "pad"),
    "a-1024": ("code", 1024, 1, "none", "pad"),
    "b-padded": ("qa", 256, 8, "none", "pad"),
    "b-flat": ("qa", 256, 8, "none", "flat"),
    "c-qlora": ("qa", 256, 8, "4bit", "pad"),
}


def model_path(name: str, work: Path, override: str | None = None) -> str:
    from adapters.model import default_model_dir

    if override:
        return override
    if name == "smollm2":
        return str(default_model_dir())
    folder = work / "gpt2-small"
    if not (folder / "config.json").exists():  # GPT-2 small shapes, random init, our tokenizer
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        tok = AutoTokenizer.from_pretrained(default_model_dir())
        cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def data_cfg(case: str, work: Path) -> dict:
    from adapters.demo.datasets import build_pydoc_qa, build_stdlib_code

    kind, seq, *_ = CASES[case]
    if kind == "code":
        files = build_stdlib_code(work / "stdlib-code")
        return {"train": str(files["train"]), "format": "text", "max_seq_len": seq}
    files = build_pydoc_qa(work / "pydoc-qa")
    return {"train": str(files["train"]), "format": "prompt_completion", "max_seq_len": seq,
            "prompt_template": "Question: {prompt}\nAnswer: "}


def recipe(args, case: str, work: Path) -> dict:
    _, seq, batch, quant, _ = CASES[case]
    return {"model": {"name": args["model_path"], "quantization": quant, "dtype": "bf16"},
            "lora": {"r": 16, "alpha": 32, "targets": "auto"},
            "data": {**data_cfg(case, work), "packing": True},
            "train": {"steps": args["steps"], "batch_size": batch, "lr": 2e-4,
                      "schedule": "constant", "log_every": 1, "seed": 0},
            "output": {"dir": str(work / f"out-{args['model']}-{case}")}}


def worker_ours(args: dict) -> dict:
    import shutil

    from adapters.config import from_dict
    from adapters.data import build
    from adapters.model import load_tokenizer
    from adapters.training import train

    work = Path(args["work"])
    cfg = recipe(args, args["case"], work)
    _, seq, batch, _, _ = CASES[args["case"]]
    # We pack examples into rows of `seq` tokens: take as many rows as `batch` examples would
    # fill (rounded up); the baseline then gets as many examples as our rows hold.
    stats = build(from_dict(cfg).data, load_tokenizer(args["model_path"])).train.stats
    mean_len = stats["tokens"] / stats["examples"]
    cfg["train"]["batch_size"] = max(1, math.ceil(batch * mean_len / seq))
    shutil.rmtree(cfg["output"]["dir"], ignore_errors=True)
    out = train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r][1:]  # step 1 is warm-up for both sides
    return {"tokens": sum(r["tokens"] for r in steps), "rows_per_step": cfg["train"]["batch_size"],
            "mean_example_len": mean_len,
            "tokens_per_step": sum(r["tokens"] for r in steps) / len(steps),
            "seconds": sum(r["seconds"] for r in steps),
            "final_loss": sum(r["loss"] for r in steps[-3:]) / 3}


def worker_baseline(args: dict) -> dict:
    """HF Trainer + peft on exactly our tokenised examples (prompt tokens masked alike)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from adapters.config import from_dict
    from adapters.data import build
    from adapters.lora import PRESETS
    from adapters.model import load_tokenizer

    work = Path(args["work"])
    _, seq, batch, quant, collator = CASES[args["case"]]
    batch = args.get("baseline_batch") or batch
    cfg = from_dict(recipe(args, args["case"], work))
    tok = load_tokenizer(args["model_path"])
    ds = build(cfg.data, tok).train.dataset.select_columns(["input_ids", "labels"])
    kw = {"dtype": torch.bfloat16}
    if quant == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args["model_path"], **kw)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                             target_modules=PRESETS[model.config.model_type]))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    coll = (DataCollatorWithFlattening() if collator == "flat"
            else DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    targs = TrainingArguments(output_dir=str(work / "hf-out"), per_device_train_batch_size=batch,
                              max_steps=args["steps"], learning_rate=2e-4,
                              lr_scheduler_type="constant", bf16=True,
                              use_cpu=not torch.cuda.is_available(),
                              logging_steps=1, report_to=[], save_strategy="no",
                              dataloader_num_workers=0, seed=0, remove_unused_columns=False)
    tr = Trainer(model=model, args=targs, train_dataset=ds, data_collator=coll,
                 callbacks=[Clock()])
    counted = {"n": 0}
    orig = coll.__call__

    def counting(features, *a, **k):
        counted.setdefault("per_step", []).append(sum(len(f["input_ids"]) for f in features))
        return orig(features, *a, **k)

    tr.data_collator = counting
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    per_step = counted["per_step"][1:args["steps"]]
    return {"tokens": sum(per_step), "tokens_per_step": sum(per_step) / len(per_step),
            "seconds": times[-1] - times[0],
            "final_loss": sum(losses[-3:]) / 3}


def run_worker(kind: str, args: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bf16_peak_flops(seconds: float = 1.0) -> float:
    import torch

    dev, size = ("cuda", 8192) if torch.cuda.is_available() else ("cpu", 1024)
    a = torch.randn(size, size, dtype=torch.bfloat16, device=dev)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=dev)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    if dev == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * n / (time.perf_counter() - t)


def matmul_params(model_path: str) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    h = getattr(c, "hidden_size", None) or c.n_embd
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    inter = getattr(c, "intermediate_size", None) or 4 * h
    kv = getattr(c, "num_key_value_heads", None) or getattr(c, "num_attention_heads", 12)
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    attn = h * h * 2 + 2 * h * (h // heads) * kv
    mlp = h * inter * (3 if c.model_type != "gpt2" else 2)
    return layers * (attn + mlp) + c.vocab_size * h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="SmolLM2 only, fewer steps (<10 min)")
    p.add_argument("--models", nargs="+", default=["smollm2", "gpt2-small"])
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--model-path", help="use this folder as the smollm2 model (e.g. a random "
                                        "model of its shape on a machine without the weights)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        fn = worker_ours if a.worker[0] == "ours" else worker_baseline
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = fn(json.loads(a.worker[1]))
        res["peak_rss_bytes"] = max(peak_before, resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss) * 1024
        import torch

        if torch.cuda.is_available():  # on a GPU the figure that matters is device memory
            res["peak_rss_bytes"] = torch.cuda.max_memory_allocated()
        print(json.dumps(res))
        return
    if a.quick:
        a.models, a.steps = ["smollm2"], 8
        a.cases = ["a-256", "b-padded", "b-flat", "c-qlora"]
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    peak = bf16_peak_flops()
    results = []
    for model in a.models:
        path = model_path(model, out, a.model_path if model == "smollm2" else None)
        for case in a.cases:
            args = {"model": model, "model_path": path, "case": case, "steps": a.steps,
                    "work": str(out)}
            ours = run_worker("ours", args)
            if "error" not in ours and ours["rows_per_step"] and CASES[case][0] == "qa":
                # Equal tokens per step: as many examples as our packed rows carried.
                args["baseline_batch"] = max(1, round(ours["tokens_per_step"]
                                                      / ours["mean_example_len"]))
            base = run_worker("baseline", args)
            row = summarise(model, case, base, ours, peak, matmul_params(path))
            results.append(row)
            print(format_row(row), flush=True)
    write_report(out, results, peak, a)


def summarise(model, case, base, ours, peak, params) -> dict:
    row = {"model": model, "case": case, "baseline": base, "ours": ours}
    if "error" in base or "error" in ours:
        return row
    for side in (base, ours):
        side["tokens_per_s"] = side["tokens"] / max(side["seconds"], 1e-9)
        side["peak_fraction"] = side["tokens_per_s"] * 4 * params / peak
    row["speedup"] = ours["tokens_per_s"] / base["tokens_per_s"]
    row["memory_ratio"] = ours["peak_rss_bytes"] / base["peak_rss_bytes"]
    row["loss_delta"] = ours["final_loss"] / base["final_loss"] - 1
    return row


def format_row(r: dict) -> str:
    if "speedup" not in r:
        return (f"| {r['model']} | {r['case']} | error: {r['baseline'].get('error', '')} "
                f"{r['ours'].get('error', '')} |")
    b, o = r["baseline"], r["ours"]
    return (f"| {r['model']} | {r['case']} | {b['tokens_per_s']:.0f} | {o['tokens_per_s']:.0f} "
            f"| **{r['speedup']:.2f}x** | {b['peak_rss_bytes'] / 1e9:.2f} | "
            f"{o['peak_rss_bytes'] / 1e9:.2f} | **{r['memory_ratio']:.2f}** | "
            f"{b['final_loss']:.3f} | {o['final_loss']:.3f} | {100 * r['loss_delta']:+.1f}% | "
            f"{100 * o['peak_fraction']:.0f}% |")


HEADER = ("| model | case | baseline tok/s | ours tok/s | speed-up | baseline peak GB | "
          "ours peak GB | memory ratio | baseline loss | ours loss | loss delta | "
          "ours % of bf16 peak |\n|" + "---|" * 12)


def write_report(out: Path, results: list[dict], peak: float, a) -> None:
    text = (f"# Training benchmark\n\n{a.steps} steps per run (first step excluded from "
            f"timing), measured bf16 matmul peak {peak / 1e9:.0f} GFLOP/s. Tokens are "
            "non-padding tokens.\n\n" + HEADER + "\n" +
            "\n".join(format_row(r) for r in results) + "\n")
    (out / "bench_train.md").write_text(text)
    (out / "bench_train.json").write_text(json.dumps(
        {"peak_flops": peak, "steps": a.steps, "results": results}, indent=1))
    print("\n" + text)
    print(f"written: {out / 'bench_train.md'}, {out / 'bench_train.json'}")


if __name__ == "__main__":
    main()
