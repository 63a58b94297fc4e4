"""The two sides of scripts/bench_train.py, each run in its own worker process: our loop, the
HF Trainer + peft baseline under a given set of user switches, the padding-free check of the
baseline's batches, and the attention probe that picks the tuned baseline's attention."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

CASES = {  # name -> (dataset, seq_len, batch, quantization, baseline collator)
    "a-256": ("code", 256, 4, "none", "pad"),
    "a-1024": ("code", 1024, 1, "none", "pad"),
    "b-padded": ("qa", 256, 8, "none", "pad"),
    "b-flat": ("qa", 256, 8, "none", "flat"),
    "c-qlora": ("qa", 256, 8, "4bit", "pad"),
    "c-qlora-flat": ("qa", 256, 8, "4bit", "flat"),
}
GPU_CASES = {"g-bf16": ("code", 2048, 1, "none", "pad"),
             "g-qlora": ("code", 2048, 1, "4bit", "pad")}
ALL_CASES = {**CASES, **GPU_CASES}
HELDOUT = 24  # held-out examples (eval split) each side's adapter is scored on, CPU runs
FLAT_CHECK = 8  # examples of the first padding-free batch checked against each one alone
FLAT_TOL = 1e-3  # fp32 per-example mean loss, nats: far above fp32 noise, far below a leak
# The switches an HF user has, as the baseline's settings; use_cache=False on every baseline.
DEFAULT = {"attn": "sdpa", "input_cast": True, "liger": False}
SWITCHES = {"no-input-cast": ({"input_cast": False},
                              "peft.helpers.disable_input_dtype_casting (ours: the same)"),
            "eager": ({"attn": "eager"}, "attn_implementation='eager' instead of sdpa"),
            "liger": ({"liger": True}, "TrainingArguments(use_liger_kernel=True), CUDA only")}


def fixed_length(case: str) -> bool:
    return ALL_CASES[case][0] == "code"


def data_cfg(case: str, work: Path, build: bool = False) -> dict:
    """The case's data section; the files are written by the driver once per run (build),
    not by each worker: pydoc text can hold object addresses, which differ per process."""
    from adapters.demo.datasets import build_pydoc_qa, build_stdlib_code

    kind, seq, *_ = ALL_CASES[case]
    if kind == "code":
        folder = work / f"stdlib-code-{seq}"
        if build or not (folder / "train.jsonl").exists():
            # Source files cut at ~8 characters per token of the row length: full rows exist.
            build_stdlib_code(folder, max_chars=max(12_000, 8 * seq))
        return {"train": str(folder / "train.jsonl"), "format": "text", "max_seq_len": seq}
    if build or not (work / "pydoc-qa" / "train.csv").exists():
        build_pydoc_qa(work / "pydoc-qa")
    return {"train": str(work / "pydoc-qa" / "train.csv"), "format": "prompt_completion",
            "max_seq_len": seq, "prompt_template": "Question: {prompt}\nAnswer: "}


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


def rows_per_step(case: str, lengths: list[int]) -> int:
    """Our batch: fixed-length, the case's rows; packed, as many rows as its batch of
    examples would fill (rounded up)."""
    _, seq, batch, _, _ = ALL_CASES[case]
    return batch if fixed_length(case) else max(1, math.ceil(batch * sum(lengths)
                                                             / len(lengths) / seq))


def our_steps(case: str, lengths: list[int]) -> list[list[int]]:
    """The example indices of each step of our loop's first epoch (data/packing.py Batcher:
    rows_per_step packed rows, or single rows, in a seeded shuffled order; examples in source
    order inside a row): the baselines get exactly these, step by step."""
    from adapters.data.packing import epoch_order, pack_bins

    items = ([[i] for i in range(len(lengths))] if fixed_length(case)
             else pack_bins(lengths, ALL_CASES[case][1]))
    order, rows = epoch_order(len(items), 0, 0), rows_per_step(case, lengths)
    return [[i for it in order[s:s + rows] for i in items[it]]
            for s in range(0, len(order) - rows + 1, rows)]


def examples(args: dict, split: str = "train"):
    """The case's tokenised (input_ids, labels) of `split`, as our loop sees them."""
    from adapters.config import from_dict
    from adapters.data import build
    from adapters.model import load_tokenizer

    case = args["case"]
    cfg = recipe(args, case, Path(args["work"]))
    if split != "train":
        train = Path(cfg["data"]["train"])
        cfg["data"]["train"] = str(train.with_name(split + train.suffix))
    tok = load_tokenizer(args["model_path"])
    bundle = build(from_dict(cfg).data, tok)
    if fixed_length(case):
        bundle = full_rows(bundle, ALL_CASES[case][1])
    return bundle.train.dataset.select_columns(["input_ids", "labels"]), tok


def base_kwargs(quant: str, attn: str = "sdpa", dtype=None) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    kw = {"dtype": dtype or torch.bfloat16, "attn_implementation": attn}
    if quant == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    return kw


def lora_model(args: dict, attn: str = "sdpa", dtype=None, quant: str | None = None):
    """The base with peft's LoRA as the baseline attaches it, use_cache off."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.lora import PRESETS

    quant = ALL_CASES[args["case"]][3] if quant is None else quant
    torch.manual_seed(0)  # as our loop seeds before it loads the base and draws LoRA's A
    model = AutoModelForCausalLM.from_pretrained(args["model_path"],
                                                 **base_kwargs(quant, attn, dtype))
    # Off on every side (ours: model.py). Left on, the model makes a KV cache in every
    # forward and HF skips its packed-sequence detection (masking_utils): examples mix.
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                            target_modules=PRESETS[model.config.model_type]))


def heldout_loss(args: dict, adapter: Path, with_base: bool = False) -> dict:
    """Token-weighted mean loss of base + `adapter` on the held-out examples, by transformers'
    own loss (the same code for both sides); with_base: the base's too (adapter off)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not args.get("heldout", True):  # random weights, or a repeat after the first
        return {}
    ds, _ = examples(args, "eval")
    rows = [(ds[i]["input_ids"], ds[i]["labels"]) for i in range(min(HELDOUT, len(ds)))]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(
        args["model_path"], device_map={"": device}, **base_kwargs(ALL_CASES[args["case"]][3]))
    model = PeftModel.from_pretrained(base, str(adapter)).eval()

    def mean() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, labels in rows:
                n = sum(1 for x in labels[1:] if x != -100)
                out = model(input_ids=torch.tensor([ids], device=device),
                            labels=torch.tensor([labels], device=device))
                total, count = total + float(out.loss) * n, count + n
        return total / max(count, 1)

    res = {"heldout_loss": mean(), "heldout_examples": len(rows)}
    with model.disable_adapter():
        return {**res, "base_heldout_loss": mean()} if with_base else res


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss() -> int:
    """This worker's peak memory so far: host RSS on CPU, device memory on a GPU. Taken when
    training ends, before the held-out scoring."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bf16_peak_flops(seconds: float = 1.0) -> float:
    """The measured bf16 matmul rate (FLOP/s) of this machine: a step's ceiling."""
    import torch

    dev, size = ("cuda", 8192) if torch.cuda.is_available() else ("cpu", 1024)
    a = torch.randn(size, size, dtype=torch.bfloat16, device=dev)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=dev)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    sync()
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


def worker_ours(args: dict) -> dict:
    import shutil

    from adapters.training import train
    from adapters.training import trainer as loop

    case, work = args["case"], Path(args["work"])
    cfg = recipe(args, case, work)
    ds, _ = examples(args)
    cfg["train"]["batch_size"] = rows_per_step(case, [len(x) for x in ds["input_ids"]])
    if fixed_length(case):
        orig_build = loop.build_data
        loop.build_data = lambda *a, **k: full_rows(orig_build(*a, **k), ALL_CASES[case][1])
    ends: list[float] = []
    tokens: list[int] = []
    orig_step = loop.step

    def timed_step(run):
        m = orig_step(run)
        sync()
        ends.append(time.perf_counter())
        tokens.append(m["tokens"])
        return m

    loop.step = timed_step
    shutil.rmtree(cfg["output"]["dir"], ignore_errors=True)
    out = train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r][-3:]
    return {"tokens": sum(tokens[1:]), "seconds": ends[-1] - ends[0],
            "rows_per_step": cfg["train"]["batch_size"],
            "tokens_per_step": sum(tokens[1:]) / len(tokens[1:]),
            "final_loss": sum(losses) / len(losses), "peak_rss_bytes": peak_rss(),
            **heldout_loss(args, out, with_base=True)}


def _collator(tok, kind: str):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    return (DataCollatorWithFlattening() if kind == "flat"
            else DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))


def worker_baseline(args: dict) -> dict:
    """HF Trainer + peft on exactly our tokenised examples (prompt tokens masked alike), with
    the switches of args["settings"] (DEFAULT, plus those SWITCHES names)."""
    import torch
    from peft.helpers import disable_input_dtype_casting
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainerCallback, TrainingArguments

    work, s = Path(args["work"]), {**DEFAULT, **args.get("settings", {})}
    ds, tok = examples(args)
    steps = our_steps(args["case"], [len(x) for x in ds["input_ids"]])
    model = lora_model(args, attn=s["attn"])
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            sync()
            ends.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(work / "hf-out"), max_steps=args["steps"], learning_rate=2e-4,
        per_device_train_batch_size=len(steps[0]),  # the loader below sets each batch
        lr_scheduler_type="constant", bf16=True, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=bool(args.get("ckpt")), use_liger_kernel=s["liger"],
        logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0, seed=0,
        remove_unused_columns=False)

    class OurSteps(Trainer):  # each step: exactly the examples of our loop's step
        def get_train_dataloader(self):
            return self.accelerator.prepare(DataLoader(
                self.train_dataset, batch_sampler=steps, collate_fn=self.data_collator))

    coll, per_step = _collator(tok, ALL_CASES[args["case"]][4]), []

    def counting(features, *a, **k):
        per_step.append(sum(len(f["input_ids"]) for f in features))
        return coll(features, *a, **k)

    tr = OurSteps(model=model, args=targs, train_dataset=ds, data_collator=counting,
                  callbacks=[Clock()])
    if args.get("same_allocator"):  # as our loop does it: once the model is loaded
        from adapters.training.runtime import keep_freed_host_memory

        keep_freed_host_memory()
    with disable_input_dtype_casting(model, active=not s["input_cast"]):
        tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h][-3:]
    counted = per_step[1:args["steps"]]
    adapter = work / f"hf-adapter-{args['model']}-{args['case']}-{args.get('side', 'hf')}"
    tr.model.save_pretrained(adapter)
    return {"tokens": sum(counted), "tokens_per_step": sum(counted) / len(counted),
            "examples_per_step": sum(map(len, steps[1:args["steps"]])) / len(counted),
            "seconds": ends[-1] - ends[0], "final_loss": sum(losses) / len(losses),
            "peak_rss_bytes": peak_rss(), **heldout_loss(args, adapter)}


def _per_example_loss(model, batch) -> list[float]:
    """Mean next-token loss of each example in `batch` (padded rows or one flattened row)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(**batch).logits.float()[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    if "position_ids" not in batch:  # one example per row
        return [float(ce[i][labels[i] != -100].mean()) for i in range(len(ce))]
    seg = ((batch["position_ids"][0] == 0).cumsum(0) - 1)[1:]  # example of each target
    keep = labels[0] != -100
    return [float(ce[0][keep & (seg == i)].mean()) for i in range(int(seg.max()) + 1)]


def check_flat(args: dict) -> dict:
    """Does the padding-free baseline keep its examples apart? Per-example losses of the first
    FLAT_CHECK examples through DataCollatorWithFlattening and the peft model as the Trainer
    calls it, against each example alone; fp32 (HF's mask does not depend on dtype). For each
    attention in args["attns"], use_cache off (as the baselines run) and on (as before)."""
    import torch

    ds, tok = examples(args)
    first = our_steps(args["case"], [len(x) for x in ds["input_ids"]])[0]
    feats = [ds[i] for i in first[:FLAT_CHECK]]  # the baselines' first batch
    coll, res = _collator(tok, "flat"), {}
    model = lora_model(args, dtype=torch.float32, quant="none").train()
    for attn in args["attns"]:
        model.get_base_model().set_attn_implementation(attn)
        model.config.use_cache = False
        solo = [_per_example_loss(model, coll([f]))[0] for f in feats]
        for cache in (False, True):
            model.config.use_cache = cache
            flat = _per_example_loss(model, coll(feats))
            res[f"{attn}/use_cache={cache}"] = max(abs(a - b) for a, b in zip(flat, solo))
    return {"max_abs_diff": res, "examples": len(feats), "tolerance": FLAT_TOL}


def probe_attention(args: dict) -> dict:
    """Seconds of a forward + backward of the baseline's first batch of each of args["cases"]
    under each candidate attention (bf16 autocast as the Trainer runs it; median of 3 after a
    warm-up, candidates alternated): the tuned baseline gets the faster."""
    import importlib.util
    import statistics

    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cands = ["sdpa", "eager"]
    if dev == "cuda" and importlib.util.find_spec("flash_attn"):
        cands.append("flash_attention_2")
    model = lora_model(args, quant="none").to(dev)
    if args.get("ckpt"):
        model.gradient_checkpointing_enable({"use_reentrant": False})
    out = {}
    for case in args["cases"]:
        ds, tok = examples({**args, "case": case})
        first = our_steps(case, [len(x) for x in ds["input_ids"]])[0]  # the first batch
        batch = _collator(tok, ALL_CASES[case][4])([ds[i] for i in first])
        batch = {k: v.to(dev) for k, v in batch.items()}
        times: dict[str, list[float]] = {a: [] for a in cands}
        for _ in range(4):
            for a in cands:
                model.get_base_model().set_attn_implementation(a)
                start = time.perf_counter()
                with torch.autocast(dev, dtype=torch.bfloat16):
                    model(**batch).loss.backward()
                sync()
                times[a].append(time.perf_counter() - start)
        out[case] = {a: statistics.median(t[1:]) for a, t in times.items()}
    return out


def worker_longest(args: dict) -> dict:
    """The longest power-of-two sequence that trains 2 steps within 24 GB."""
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


WORKERS = {"ours": worker_ours, "baseline": worker_baseline, "longest": worker_longest,
           "check": check_flat, "probe": probe_attention}
