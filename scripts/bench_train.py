#!/usr/bin/env python
"""Benchmark: `adapters train` against the HF Trainer + peft baseline, like with like.

Each run is its own subprocess (clean peak RSS; peak GPU memory on CUDA): identical model,
tokens, LoRA settings (r=16, every attention and MLP projection), batch, sequence length,
learning rate and steps. Like with like:
  - equal tokens per step: in the fixed-length cases both sides train on the same full rows of
    `seq` tokens (short tails of files are dropped on both sides, nothing is packed);
  - the same clock: wall time between the ends of optimiser steps 1 and N on both sides (ours
    around `trainer.step`, the baseline's `on_step_end`), a device synchronize on CUDA, the
    loss logged every step on both sides;
  - the same examples in the same order on both sides (the baseline walks our loop's
    shuffled order sequentially), so the final losses compare;
  - the sides interleaved and repeated (`--repeats`): the median and the spread (min-max) of
    tokens/s are reported, since timings on a shared machine vary by 30% from run to run;
  - the loss compared is each side's adapter scored by the same code on the same held-out
    examples (the data's eval split), next to the base model's; the last steps' training
    losses are of differently grouped batches when our rows are packed;
  - `adapters train` keeps freed host memory for reuse (a glibc malloc setting, part of our
    loop); the baseline runs with the defaults, as a user's script would, unless
    `--same-allocator` gives it the same setting.
Cases:
  a-256, a-1024  fixed-length text: stdlib source in windows of 256 / 1024 tokens, bf16
  b-padded       variable-length pydoc Q&A, baseline with its padding collator
  b-flat         the same, baseline with HF's padding-free DataCollatorWithFlattening
  c-qlora        4-bit nf4 base with bf16 compute (peak memory is the figure here)
--gpu: random-initialised Llama-3.2-1B and Llama-3.1-8B shapes (configs written here, no
weights), seq 2048, bf16 LoRA and QLoRA nf4, gradient checkpointing on both sides; also the
longest sequence each side trains within a 24 GB budget.

  .venv/bin/python scripts/bench_train.py --quick          # SmolLM2, 4 cases, 2 repeats
  .venv/bin/python scripts/bench_train.py --models smollm2 gpt2-small --steps 20
  .venv/bin/python scripts/bench_train.py --gpu            # on a CUDA machine
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
GPU_CASES = {"g-bf16": ("code", 2048, 1, "none", "pad"),
             "g-qlora": ("code", 2048, 1, "4bit", "pad")}
GPU_SHAPES = {  # the real shapes of the Llama 3 family, random weights
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False),
}
ALL_CASES = {**CASES, **GPU_CASES}
HELDOUT = 24  # held-out examples (eval split) each side's adapter is scored on, CPU runs


def model_path(name: str, work: Path, override: str | None = None) -> str:
    from adapters.model import default_model_dir

    if override:
        return override
    if name == "smollm2":
        return str(default_model_dir())
    folder = work / name
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    if name == "gpt2-small":  # GPT-2 small shapes, random init, our tokenizer
        cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(cfg).save_pretrained(folder)
    else:  # a Llama 3 shape: weights made on the GPU at load (no files of 2-16 GB written)
        from transformers import LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rope_theta=5e5,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                          **GPU_SHAPES[name])
        with torch.device("meta"):
            LlamaForCausalLM(cfg)  # checks the config builds
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(folder)
        del model
    tok.save_pretrained(folder)
    return str(folder)


def data_cfg(case: str, work: Path) -> dict:
    from adapters.demo.datasets import build_pydoc_qa, build_stdlib_code

    kind, seq, *_ = ALL_CASES[case]
    if kind == "code":
        # Source files cut at ~8 characters per token of the row length, so full rows exist.
        files = build_stdlib_code(work / f"stdlib-code-{seq}", max_chars=max(12_000, 8 * seq))
        return {"train": str(files["train"]), "format": "text", "max_seq_len": seq}
    files = build_pydoc_qa(work / "pydoc-qa")
    return {"train": str(files["train"]), "format": "prompt_completion", "max_seq_len": seq,
            "prompt_template": "Question: {prompt}\nAnswer: "}


def heldout_examples(args: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the first HELDOUT examples of the case's eval split (source
    files / modules neither side trains on), tokenised as the training data is."""
    from adapters.config import from_dict
    from adapters.data import build
    from adapters.model import load_tokenizer

    case, work = args["case"], Path(args["work"])
    cfg = recipe(args, case, work)
    train = Path(cfg["data"]["train"])
    cfg["data"]["train"] = str(train.with_name("eval" + train.suffix))
    bundle = build(from_dict(cfg).data, load_tokenizer(args["model_path"]))
    if fixed_length(case):
        bundle = full_rows(bundle, ALL_CASES[case][1])
    ds = bundle.train.dataset
    return [(ds[i]["input_ids"], ds[i]["labels"]) for i in range(min(HELDOUT, len(ds)))]


def base_kwargs(quant: str) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    kw = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if quant == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    return kw


def heldout_loss(args: dict, adapter: Path, with_base: bool = False) -> dict:
    """Token-weighted mean loss of base + `adapter` on the held-out examples, by transformers'
    own loss (the same code for both sides); with_base: the base's too (adapter off)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not args.get("heldout", True):  # random-initialised weights: no meaningful loss
        return {}
    examples = heldout_examples(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(
        args["model_path"], device_map={"": device}, **base_kwargs(ALL_CASES[args["case"]][3]))
    model = PeftModel.from_pretrained(base, str(adapter)).eval()

    def mean() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, labels in examples:
                n = sum(1 for x in labels[1:] if x != -100)
                out = model(input_ids=torch.tensor([ids], device=device),
                            labels=torch.tensor([labels], device=device))
                total, count = total + float(out.loss) * n, count + n
        return total / max(count, 1)

    res = {"heldout_loss": mean(), "heldout_examples": len(examples)}
    if with_base:
        with model.disable_adapter():
            res["base_heldout_loss"] = mean()
    return res


def fixed_length(case: str) -> bool:
    return ALL_CASES[case][0] == "code"


def recipe(args, case: str, work: Path) -> dict:
    _, seq, batch, quant, _ = ALL_CASES[case]
    return {"model": {"name": args["model_path"], "quantization": quant, "dtype": "bf16"},
            "lora": {"r": 16, "alpha": 32, "targets": "auto"},
            # Fixed-length rows are not packed: both sides see exactly the same rows.
            "data": {**data_cfg(case, work), "packing": not fixed_length(case)},
            "train": {"steps": args["steps"], "batch_size": batch, "lr": 2e-4,
                      "schedule": "constant", "log_every": 1, "seed": 0,
                      "gradient_checkpointing": bool(args.get("ckpt")),
                      **args.get("ours_train", {})},
            "output": {"dir": str(work / f"out-{args['model']}-{case}")}}


def full_rows(bundle, seq: int):
    """Keep only examples of exactly `seq` tokens (the same filter on both sides)."""
    ds = bundle.train.dataset
    bundle.train.dataset = ds.filter(lambda ids: len(ids) == seq, input_columns="input_ids")
    return bundle


def our_order(ds, seq: int, packed: bool) -> list[int]:
    """The example indices in the order our loop's first epoch takes them (data/packing.py:
    packed rows in a seeded shuffled order, examples in source order inside a row), so both
    sides see the same examples in the same order and their losses compare."""
    from adapters.data.packing import epoch_order, pack_bins

    lengths = [len(x) for x in ds["input_ids"]]
    items = pack_bins(lengths, seq) if packed else [[i] for i in range(len(lengths))]
    return [i for item in epoch_order(len(items), 0, 0) for i in items[item]]


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker_ours(args: dict) -> dict:
    import shutil

    from adapters.config import from_dict
    from adapters.data import build
    from adapters.model import load_tokenizer
    from adapters.training import train
    from adapters.training import trainer as loop

    work = Path(args["work"])
    cfg = recipe(args, args["case"], work)
    _, seq, batch, _, _ = ALL_CASES[args["case"]]
    stats = build(from_dict(cfg).data, load_tokenizer(args["model_path"])).train.stats
    mean_len = stats["tokens"] / stats["examples"]
    if fixed_length(args["case"]):
        orig_build = loop.build_data
        loop.build_data = lambda *a, **k: full_rows(orig_build(*a, **k), seq)
    else:  # packed rows: as many as `batch` examples would fill (rounded up)
        cfg["train"]["batch_size"] = max(1, math.ceil(batch * mean_len / seq))
    ends: list[float] = []
    tokens: list[int] = []
    orig_step = loop.step

    def timed_step(run):
        m = orig_step(run)
        _sync()
        ends.append(time.perf_counter())
        tokens.append(m["tokens"])
        return m

    loop.step = timed_step
    shutil.rmtree(cfg["output"]["dir"], ignore_errors=True)
    out = train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"tokens": sum(tokens[1:]), "seconds": ends[-1] - ends[0],
            "rows_per_step": cfg["train"]["batch_size"], "mean_example_len": mean_len,
            "tokens_per_step": sum(tokens[1:]) / len(tokens[1:]),
            "final_loss": sum(losses[-3:]) / 3, "peak_rss_bytes": peak_rss(),
            **heldout_loss(args, out, with_base=True)}


def worker_baseline(args: dict) -> dict:
    """HF Trainer + peft on exactly our tokenised examples (prompt tokens masked alike)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
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
    _, seq, batch, quant, collator = ALL_CASES[args["case"]]
    batch = args.get("baseline_batch") or batch
    cfg = from_dict(recipe(args, args["case"], work))
    tok = load_tokenizer(args["model_path"])
    bundle = build(cfg.data, tok)
    if fixed_length(args["case"]):
        bundle = full_rows(bundle, seq)
    ds = bundle.train.dataset.select_columns(["input_ids", "labels"])
    ds = ds.select(our_order(ds, seq, packed=not fixed_length(args["case"])))
    kw = base_kwargs(quant)
    torch.manual_seed(0)  # as our loop seeds before it loads the base and draws LoRA's A
    model = AutoModelForCausalLM.from_pretrained(args["model_path"], **kw)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                             target_modules=PRESETS[model.config.model_type]))
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            _sync()
            ends.append(time.perf_counter())

    coll = (DataCollatorWithFlattening() if collator == "flat"
            else DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    targs = TrainingArguments(output_dir=str(work / "hf-out"), per_device_train_batch_size=batch,
                              max_steps=args["steps"], learning_rate=2e-4,
                              lr_scheduler_type="constant", bf16=True,
                              use_cpu=not torch.cuda.is_available(),
                              gradient_checkpointing=bool(args.get("ckpt")),
                              logging_steps=1, report_to=[], save_strategy="no",
                              dataloader_num_workers=0, seed=0, remove_unused_columns=False)
    class InOurOrder(Trainer):  # the examples in the order our loop takes them (our_order)
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    tr = InOurOrder(model=model, args=targs, train_dataset=ds, data_collator=coll,
                    callbacks=[Clock()])
    per_step: list[int] = []
    orig = coll.__call__

    def counting(features, *a, **k):
        per_step.append(sum(len(f["input_ids"]) for f in features))
        return orig(features, *a, **k)

    tr.data_collator = counting
    if args.get("same_allocator"):  # as our loop does it: once the model is loaded
        from adapters.training.runtime import keep_freed_host_memory

        keep_freed_host_memory()
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    counted = per_step[1:args["steps"]]
    adapter = work / f"hf-adapter-{args['model']}-{args['case']}"
    tr.model.save_pretrained(adapter)
    return {"tokens": sum(counted), "tokens_per_step": sum(counted) / len(counted),
            "seconds": ends[-1] - ends[0], "final_loss": sum(losses[-3:]) / 3,
            "peak_rss_bytes": peak_rss(), **heldout_loss(args, adapter)}


def worker_longest(args: dict) -> dict:
    """The longest power-of-two sequence (x1.5 steps) that trains 2 steps within 24 GB."""
    import torch

    torch.cuda.set_per_process_memory_fraction(
        min(1.0, 24 * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    fn = worker_ours if args["side"] == "ours" else worker_baseline
    best, seq = 0, 2048
    while seq <= 131072:
        ALL_CASES[args["case"]] = (*ALL_CASES[args["case"]][:1], seq,
                                   *ALL_CASES[args["case"]][2:])
        try:
            fn({**args, "steps": 2})
            best = seq
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        seq *= 2
    return {"longest_seq": best}


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
    p.add_argument("--quick", action="store_true", help="SmolLM2, 4 cases, 8 steps, 2 repeats")
    p.add_argument("--gpu", action="store_true", help="Llama 3 1B/8B shapes on CUDA")
    p.add_argument("--models", nargs="+", default=["smollm2", "gpt2-small"])
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side")
    p.add_argument("--longest", action="store_true", help="--gpu: also the longest sequence")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--model-path", help="use this folder as the smollm2 model (e.g. a random "
                                        "model of its shape on a machine without the weights)")
    p.add_argument("--no-heldout", action="store_true",
                   help="skip scoring both adapters on held-out data (random-weight models; "
                        "always skipped with --gpu)")
    p.add_argument("--same-allocator", action="store_true",
                   help="give the baseline our loop's malloc setting too (runtime.py)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker_main(*a.worker)
    if a.quick:
        a.models, a.steps, a.repeats = ["smollm2"], 8, 2
        a.cases = ["a-256", "b-padded", "b-flat", "c-qlora"]
    if a.gpu:
        a.models, a.cases, a.steps = list(GPU_SHAPES), list(GPU_CASES), min(a.steps, 10)
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    peak = bf16_peak_flops()
    print(LIKE_WITH_LIKE, flush=True)
    results = []
    for model in a.models:
        path = model_path(model, out, a.model_path if model == "smollm2" else None)
        for case in a.cases:
            args = {"model": model, "model_path": path, "case": case, "steps": a.steps,
                    "work": str(out), "ckpt": a.gpu, "same_allocator": a.same_allocator,
                    "heldout": not (a.no_heldout or a.gpu)}
            row = compare(args, a.repeats)
            if a.longest and a.gpu:
                for side in ("ours", "baseline"):
                    row[side]["longest_seq"] = run_worker(
                        "longest", {**args, "side": side}).get("longest_seq")
            row = summarise(model, case, row["baseline"], row["ours"], peak, matmul_params(path))
            results.append(row)
            print(format_row(row), flush=True)
    write_report(out, results, peak, a)


LIKE_WITH_LIKE = (
    "Like with like: the same rows (fixed-length cases: only full rows, no packing on either "
    "side; variable-length: the baseline gets as many examples per step as our packed rows "
    "hold), the examples in the same order on both sides, wall time between the ends of "
    "steps 1 and N on both sides, the loss logged every step on both sides, sides "
    "interleaved and repeated; tok/s is the median over repeats with the spread (min-max) "
    "beside it. Loss: each side's adapter (and the base) scored by transformers' own loss on "
    f"the same {HELDOUT} held-out examples. Ours keeps freed host memory for reuse (a glibc "
    "malloc setting `adapters train` makes); the baseline has glibc's defaults unless "
    "--same-allocator.")


def peak_rss() -> int:
    """Peak memory of this worker so far: host RSS on CPU, device memory on a GPU (where it
    is the figure that matters). Taken when training ends, before the held-out scoring."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_main(kind: str, raw: str) -> None:
    fn = {"ours": worker_ours, "baseline": worker_baseline, "longest": worker_longest}[kind]
    res = fn(json.loads(raw))
    res.setdefault("peak_rss_bytes", peak_rss())
    print(json.dumps(res))


def compare(args: dict, repeats: int) -> dict:
    """Both sides `repeats` times, interleaved (ours first, then the baseline first, ...)."""
    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    for r in range(repeats):
        for side in (("ours", "baseline") if r % 2 == 0 else ("baseline", "ours")):
            if side == "baseline" and runs["ours"] and "error" not in runs["ours"][0] \
                    and not fixed_length(args["case"]):
                o = runs["ours"][0]  # equal tokens per step: examples in our packed rows
                args["baseline_batch"] = max(1, round(o["tokens_per_step"]
                                                      / o["mean_example_len"]))
            res = run_worker(side, args)
            if "error" not in res:
                res["tokens_per_s"] = res["tokens"] / max(res["seconds"], 1e-9)
            runs[side].append(res)
    return {side: pool(rs) for side, rs in runs.items()}


def pool(rs: list[dict]) -> dict:
    """Median tokens/s over the repeats, with min and max; the other figures of that run."""
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return rs[0]
    ok.sort(key=lambda r: r["tokens_per_s"])
    mid = dict(ok[len(ok) // 2])
    mid["tokens_per_s_all"] = [round(r["tokens_per_s"], 1) for r in ok]
    mid["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
    return mid


def summarise(model, case, base, ours, peak, params) -> dict:
    row = {"model": model, "case": case, "baseline": base, "ours": ours}
    if "error" in base or "error" in ours:
        return row
    for side in (base, ours):
        side["peak_fraction"] = side["tokens_per_s"] * 4 * params / peak
    row["speedup"] = ours["tokens_per_s"] / base["tokens_per_s"]
    row["memory_ratio"] = ours["peak_rss_bytes"] / base["peak_rss_bytes"]
    if "heldout_loss" in ours and "heldout_loss" in base:
        row["loss_delta"] = ours["heldout_loss"] / base["heldout_loss"] - 1
    row["tokens_per_step"] = (base["tokens_per_step"], ours["tokens_per_step"])
    return row


def _spread(side: dict) -> str:
    v = side["tokens_per_s_all"]
    return f"{side['tokens_per_s']:.0f} ({min(v):.0f}-{max(v):.0f})"


def format_row(r: dict) -> str:
    if "speedup" not in r:
        return (f"| {r['model']} | {r['case']} | error: {r['baseline'].get('error', '')} "
                f"{r['ours'].get('error', '')} |")
    b, o = r["baseline"], r["ours"]
    longest = (f" | {b.get('longest_seq')} | {o.get('longest_seq')}"
               if "longest_seq" in o else "")
    loss = (f"{o['base_heldout_loss']:.3f} / {b['heldout_loss']:.3f} / "
            f"{o['heldout_loss']:.3f} | {100 * r['loss_delta']:+.2f}%"
            if "loss_delta" in r else "- | -")
    return (f"| {r['model']} | {r['case']} | {b['tokens_per_step']:.0f} / "
            f"{o['tokens_per_step']:.0f} | {_spread(b)} | {_spread(o)} "
            f"| **{r['speedup']:.2f}x** | {b['peak_rss_bytes'] / 1e9:.2f} | "
            f"{o['peak_rss_bytes'] / 1e9:.2f} | **{r['memory_ratio']:.2f}** | {loss} | "
            f"{100 * o['peak_fraction']:.0f}%{longest} |")


HEADER = ("| model | case | tokens/step base / ours | baseline tok/s (min-max) | "
          "ours tok/s (min-max) | speed-up (medians) | baseline peak GB | ours peak GB | "
          "memory ratio | held-out loss base model / baseline / ours | loss delta | "
          "ours % of bf16 peak |\n|"
          + "---|" * 12)


def write_report(out: Path, results: list[dict], peak: float, a) -> None:
    text = (f"# Training benchmark\n\n{a.steps} steps per run, {a.repeats} interleaved runs "
            f"per side, measured bf16 matmul peak {peak / 1e9:.0f} GFLOP/s. Tokens are "
            f"non-padding tokens.\n\n{LIKE_WITH_LIKE}\n\n" + HEADER + "\n" +
            "\n".join(format_row(r) for r in results) + "\n")
    (out / "bench_train.md").write_text(text)
    (out / "bench_train.json").write_text(json.dumps(
        {"peak_flops": peak, "steps": a.steps, "repeats": a.repeats, "results": results},
        indent=1))
    print("\n" + text)
    print(f"written: {out / 'bench_train.md'}, {out / 'bench_train.json'}")


if __name__ == "__main__":
    main()
