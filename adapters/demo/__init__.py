"""The main job: two domain adapters on one base, trained, evaluated, swapped and merged.

Steps (each reused on a re-run unless `fresh`): build the stdlib datasets, train a pydoc-qa
and a stdlib-code adapter in one pass on one base (QLoRA on the embedded SmolLM2-135M,
training/jobs.py), a short GRPO run from the
pydoc-qa adapter (pydoc-grpo: token F1 against the docstring as its reward), evaluate the base
and the adapters on both held-out sets, answer the same prompts with base / each adapter / one mixed
batch, merge the pydoc-qa adapter with verification, record the results in each adapter's
model card and pack each into a verified zip (`shared/`), and write `report.md`.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..adapter import read_base_name
from ..adapter.archive import pack
from ..config import BASE_NAME, load_recipe
from ..eval import evaluate, table, write_results
from ..eval.record import record_eval
from ..merge import merge_adapter
from ..model import load_base, load_tokenizer, resolve_model_path
from ..recipe_jobs import Job
from ..serving.registry import Registry
from ..share.export import ExportError, export
from ..share.parity import certify, prompts_for, record
from ..share.verify import verify
from ..training import train
from ..training.jobs import train_jobs
from .datasets import build_pydoc_qa, build_stdlib_code

log = logging.getLogger(__name__)
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DOMAINS = {"pydoc-qa": "smollm2-pydoc-qa.yaml", "stdlib-code": "smollm2-stdlib-code.yaml"}
# online RL after SFT: name -> (recipe, the adapter it starts from, steps: tiny, full)
ONLINE = {"pydoc-grpo": ("smollm2-pydoc-grpo.yaml", "pydoc-qa", (2, 8))}
PARITY = (8, 32)  # the full demo's certificate: prompts, greedy tokens
# The domain adapters as two separate runs, before they trained in one pass: training.seconds
# of their manifests (loading included) in the fresh-clone demo at that commit
SEPARATE_BEFORE = ("b47fcef", {"pydoc-qa": 107.7, "stdlib-code": 131.9})
TINY = ["model.quantization=none", "model.dtype=fp32", "train.batch_size=2",
        "train.eval_every=2", "train.save_every=2", "data.max_seq_len=64", "lora.r=4"]
TEMPLATE = "Question: {prompt}\nAnswer: "
PROMPTS = [  # (prompt, the adapter that fits it)
    (TEMPLATE.format(prompt="What does the function `json.dumps(obj, *, skipkeys=False, "
                     "ensure_ascii=True, indent=None)` do?"), "pydoc-qa"),
    (TEMPLATE.format(prompt="What does the class `collections.Counter(iterable=None, /, "
                     "**kwds)` do?"), "pydoc-qa"),
    ("import os\n\n\ndef list_python_files(folder):\n    \"\"\"Return the .py files in folder."
     "\"\"\"\n", "stdlib-code"),
]


def tiny_model(folder: Path) -> str:
    """A tiny random Llama with a BPE tokenizer trained here on stdlib text (CI, offline)."""
    if (folder / "config.json").exists():
        return str(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([inspect.getsource(json), inspect.getsource(shutil)],
                            trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel
                                                .alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id,
                      initializer_range=0.2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def _configs(out: Path, data: dict, tiny: bool, steps: int | None) -> dict:
    cfgs = {}
    base = tiny_model(out / "tiny-model") if tiny else None
    for name, recipe in DOMAINS.items():
        over = [f"data.train={data[name]['train']}", f"data.eval={data[name]['eval']}",
                f"output.dir={out / name}"]
        if tiny:
            over += [f"model.name={base}", "train.steps=4", *TINY]
        if steps:
            over.append(f"train.steps={steps}")
        cfgs[name] = load_recipe(RECIPES / recipe, over)
    for name, (recipe, start, (tiny_steps, full_steps)) in ONLINE.items():
        src = cfgs[start]
        over = [f"data.train={src.data.train}", f"data.eval={src.data.eval}",
                f"output.dir={out / name}", f"lora.init_from={src.output.dir}",
                f"train.steps={tiny_steps if tiny else full_steps}", "train.eval_every=0",
                "train.save_every=0"]
        if tiny:
            over += [f"model.name={base}", *TINY, "grpo.max_completion_length=8",
                     "grpo.num_generations=2", "train.eval_every=0", "train.save_every=0"]
        cfgs[name] = load_recipe(RECIPES / recipe, over)
    return cfgs


def _train_domains(cfgs: dict, progress: bool) -> float | None:
    """The domain adapters not trained yet, in one pass on one base (training/jobs.py);
    returns its seconds (None: nothing to train)."""
    todo = [Job(n, c) for n, c in cfgs.items() if n in DOMAINS
            and not (Path(c.output.dir) / "adapter_model.safetensors").exists()]
    if not todo:
        log.info("domain adapters already trained (re-run with --fresh to retrain)")
        return None
    paused = [j for j in todo if list(Path(j.cfg.output.dir).glob("checkpoints/step-*"))]
    if paused and len(paused) < len(todo):  # the pass resumes together or starts afresh
        for j in paused:
            shutil.rmtree(Path(j.cfg.output.dir) / "checkpoints")
        paused = []
    t0 = time.perf_counter()
    train_jobs(todo, resume="latest" if paused else None, progress=progress)
    return time.perf_counter() - t0


def _train_all(cfgs: dict, fresh: bool, progress: bool) -> tuple[dict[str, Path], float | None]:
    if fresh:
        for cfg in cfgs.values():
            shutil.rmtree(cfg.output.dir, ignore_errors=True)
    one_pass = _train_domains(cfgs, progress)
    outs = {}
    for name, cfg in cfgs.items():
        out = Path(cfg.output.dir)
        if (out / "adapter_model.safetensors").exists():
            log.info("%s: adapter already trained (re-run with --fresh to retrain)", name)
        else:
            resume = "latest" if (out / "checkpoints").exists() else None
            train(cfg, resume=resume, progress=progress)
        outs[name] = out
    return outs, one_pass


def _samples(cfg, adapters: dict[str, Path], max_new_tokens: int) -> list[dict]:
    """Greedy answers to PROMPTS from the base, each adapter, and all in one mixed batch."""
    model, tok = load_base(cfg.model)
    reg = Registry(model, tok, capacity=max(1, len(adapters)))
    for name, folder in adapters.items():
        reg.load(name, folder)
    prompts = [p for p, _ in PROMPTS]

    def answer(names):  # one name per prompt; None is the plain base
        return [t.strip() for t in reg.generate(prompts, names, max_new_tokens=max_new_tokens)]

    answers = {BASE_NAME: answer(None)}
    for name in adapters:
        answers[name] = answer(name)
    answers["mixed batch"] = answer([a for _, a in PROMPTS])
    return [{"prompt": p, "fits": a, **{k: v[i] for k, v in answers.items()}}
            for i, (p, a) in enumerate(PROMPTS)]


def _share(out: Path, adapters: dict[str, Path], rows: list[dict]) -> list[str]:
    """Eval results into each adapter's card, then each packed into one verified file."""
    lines = []
    for name, folder in adapters.items():
        record_eval(folder, name, rows)
        archive = pack(folder, out / "shared" / f"{name}.zip")
        failed = [f"{c.name}: {c.detail}" for c in verify(archive) if not c.ok]
        lines.append(f"- `{archive.relative_to(out)}`: {archive.stat().st_size / 1e6:.1f} MB, "
                     + ("verified (sha256, finite, shapes, no pickles)" if not failed else
                        "verification FAILED: " + "; ".join(failed))
                     + f"; model card `{name}/README.md`")
    return lines


def _export_gguf(out: Path, adapters: dict[str, Path]) -> list[str]:
    """Each adapter as a llama.cpp LoRA GGUF (always written), with llama.cpp's agreement
    figures where its runtime is installed (else the report says it was not checked)."""
    lines = ["", "## Run it elsewhere: each adapter as a llama.cpp LoRA GGUF", ""]
    for name, folder in adapters.items():
        if name in ONLINE:  # the same shapes as the adapter it started from: not again
            continue
        try:
            res = export(folder, "gguf-lora", out / "gguf" / f"{name}.gguf")
        except ExportError as e:
            lines.append(f"- {name}: export FAILED: {e}")
            continue
        if res.report is None:
            lines += [f"- `gguf/{name}.gguf`, written", *(f"  - {n}" for n in res.notes)]
        else:
            lines += [f"- `gguf/{name}.gguf`, verified in {res.report.lines()[0]}",
                      *(f"  - {x.strip()}" for x in res.report.lines()[1:])]
    return lines


def _certify(adapters: dict[str, Path], tiny: bool) -> list[str]:
    """Each domain adapter's parity certificate, into its card and a table here."""
    lines = ["", "## Parity: the same answers in every runtime (`adapters verify --parity`)", ""]
    n, new = (4, 8) if tiny else PARITY
    for name in DOMAINS:
        folder = adapters[name]
        tok = load_tokenizer(resolve_model_path(read_base_name(folder)))
        texts, source = prompts_for(folder, tok, n)
        t0 = time.perf_counter()
        info = certify(folder, None, texts, new)
        record(folder, info)
        lines += [f"### {name}: {'every runtime passed' if info.passed else 'a runtime FAILED'}"
                  f" ({len(texts)} prompts from {source}, {time.perf_counter() - t0:.0f} s)", "",
                  "| runtime | precision | top-1 | KL | greedy | result |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r.runtime} | {r.precision} | {r.top1:.1%} | {r.kl:.4f} | {r.greedy:.0%} "
                  f"| {'pass' if r.passed else 'FAIL: ' + r.note[:200]} |" for r in info.rows]
        lines += [""] + [f"- not checked: {k}: {v}" for k, v in info.skipped.items()] + [""]
    return lines


def _one_pass_line(seconds: float | None) -> str:
    commit, before = SEPARATE_BEFORE
    was = (f"Before, as two runs one after the other (fresh-clone demo at {commit}, this "
           f"2-core CPU): {' s + '.join(f'{v:.0f}' for v in before.values())} s = "
           f"{sum(before.values()):.0f} s.")
    if seconds is None:
        return f"{' and '.join(DOMAINS)} train in one pass on one base (`jobs:`). {was}"
    return (f"{' and '.join(DOMAINS)} trained in one pass on one base (`jobs:`, "
            f"training/jobs.py): {seconds:.0f} s, loading the base included. {was}")


def _report(out: Path, rows: list[dict], samples: list[dict], merge_info: dict,
            cfgs: dict, seconds: float, shared: list[str], one_pass: float | None) -> Path:
    lines = ["# adapters demo: two domain adapters on one base", "",
             f"Base: `{next(iter(cfgs.values())).model.name}` "
             f"({next(iter(cfgs.values())).model.quantization} during training). "
             f"Wall time: {seconds / 60:.1f} min.", "",
             "## Held-out loss (each adapter on both domains)", "", table(rows, "loss"), "",
             table(rows, "token_accuracy") if "token_accuracy" in rows[0] else "", "",
             "## Held-out token F1 of greedy answers (pydoc-grpo: GRPO on this reward)", "",
             table(rows, "token_f1") if any("token_f1" in r for r in rows) else "", "",
             "![eval](eval/eval.png)", "",
             "## Training curves", "", _one_pass_line(one_pass), ""]
    for name in cfgs:
        summary = json.loads((out / name / "manifest.json").read_text()).get("training", {})
        lines += [f"### {name}", "", f"{summary.get('steps')} steps, "
                  f"{summary.get('tokens')} tokens, {summary.get('tokens_per_s')} tokens/s, "
                  f"peak memory {summary.get('peak_memory_bytes', 0) / 1e9:.2f} GB", "",
                  f"![{name}]({name}/loss.png)", ""]
    lines += ["## The same prompts: base, each adapter, and one mixed batch", ""]
    for s in samples:
        lines += [f"**Prompt** (fits `{s['fits']}`):", "", "```", s["prompt"].strip(), "```", ""]
        for k, v in s.items():
            if k not in ("prompt", "fits"):
                lines.append(f"- **{k}**: {v[:300]!r}")
        lines.append("")
    lines += ["## Merge of pydoc-qa into the base (verified)", "",
              "```json", json.dumps(merge_info, indent=1), "```", "",
              "## Share: one file per adapter (`adapters pack`, `adapters verify`)", "",
              *shared, "", "## Files", ""]
    lines += [f"- `{p.relative_to(out)}`" for p in sorted(out.glob("*")) if p.name != "data"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def run_demo(out: str | Path = "runs/demo", tiny: bool = False, fresh: bool = False,
             steps: int | None = None, eval_rows: int | None = None,
             progress: bool = True) -> Path:
    """Run the whole demo; returns the path of report.md."""
    t0 = time.perf_counter()
    out = Path(out)
    data = {"pydoc-qa": build_pydoc_qa(out / "data" / "pydoc-qa",
                                       max_rows=40 if tiny else None),
            "stdlib-code": build_stdlib_code(out / "data" / "stdlib-code",
                                             max_chars=2000 if tiny else 12_000,
                                             eval_chars=1000 if tiny else 4000)}
    cfgs = _configs(out, data, tiny, steps)
    adapters, one_pass = _train_all(cfgs, fresh, progress)
    first = next(iter(cfgs.values()))
    datasets = {name: cfg.data for name, cfg in cfgs.items() if name in DOMAINS}
    for dcfg, d in zip(datasets.values(), data.values()):
        dcfg.train = str(d["eval"])  # evaluate on the held-out modules
    # Token accuracy needs full logits: worth it on the tiny model, minutes on the 135M one.
    rows = evaluate(first.model.name, adapters, datasets, first.model.quantization,
                    max_rows=eval_rows or (16 if tiny else 80), accuracy=tiny,
                    progress=progress, generate=8 if tiny else 24,
                    max_new_tokens=8 if tiny else 48)
    write_results(rows, out / "eval")
    samples = _samples(first, adapters, 8 if tiny else 48)
    merged, check = merge_adapter(adapters["pydoc-qa"], out / "merged-pydoc-qa",
                                  data=[r["prompt"] for r in samples])
    info = {"folder": str(merged), **(check.as_dict() if check else {})}
    shared = _export_gguf(out, adapters) + _certify(adapters, tiny)
    shared = _share(out, adapters, rows) + shared  # packed with their certificates
    return _report(out, rows, samples, info, cfgs, time.perf_counter() - t0, shared,
                   None if tiny else one_pass)
