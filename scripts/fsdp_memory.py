"""Per-rank memory of the base under train.parallel=ddp vs fsdp: 2 CPU ranks (gloo).

    .venv/bin/python scripts/fsdp_memory.py [--layers 20] [--hidden 1024] [--steps 2]
        [--quantization none|4bit|8bit] [--modes ddp,fsdp] [--set KEY=VALUE ...]

Builds (once) a random Llama whose weights are almost all in decoder blocks (~670 MB in bf16
with the defaults; the tokenizer is the tests' tiny one, so the replicated lm_head is small),
then for each mode runs two ranks under torchrun that set the run up as `adapters train`
does, take a few steps, and report per rank: the bytes of weights they hold, their resident
memory after setup and after the steps, and their peak after setup (loading: under ddp each
rank reads the whole base; under fsdp rank 0 alone does, the others build it on the meta
device and receive their shards) and after the steps. With --quantization the base is read
through bitsandbytes (the compute dtype stays bf16): under fsdp rank 0 alone quantizes it and
sends the others their shards and the quantization states.

The package imported is whichever `adapters` Python finds first: to measure another version
of the code, put its folder first on PYTHONPATH (e.g. a `git archive` of an older commit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss(kind: str = "VmRSS") -> int:
    """Resident bytes: VmRSS (all), RssAnon (allocated), RssFile (mapped files' pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def build(folder: Path, layers: int, hidden: int) -> Path:
    if (folder / "config.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from conftest import build_tokenizer, make_llama

    tok = build_tokenizer(folder)
    torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16: half the memory
    return make_llama(folder, tok, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64, initializer_range=0.02)


def worker(mode: str, model: str, steps: int, out: str, quantization: str,
           extra: list[str]) -> None:
    from adapters.config import load_recipe
    from adapters.training import distributed
    from adapters.training.trainer import setup, step

    data = Path(out) / "qa.csv"
    data.write_text("input,output\n" + "".join(f"q{i},a{i}\n" for i in range(64)))
    cfg = load_recipe(None, [f"model.name={model}", "model.dtype=bf16", f"data.train={data}",
                             "data.max_seq_len=64", "train.batch_size=1", "lora.r=8",
                             f"train.parallel={mode}", "train.gradient_checkpointing=true",
                             f"model.quantization={quantization}",
                             f"output.dir={Path(out) / mode}", *extra])
    run = setup(cfg)
    held = sum((p.to_local() if hasattr(p, "to_local") else p).untyped_storage().nbytes()
               for p in run.model.parameters())
    after_setup = rss()
    peak_setup = peak_rss()
    for _ in range(steps):
        step(run)
    row = {"mode": mode, "quantization": quantization, "rank": run.dist.rank,
           "weights_held_mb": held / 1e6,
           "rss_after_setup_mb": after_setup / 1e6, "rss_after_steps_mb": rss() / 1e6,
           "anon_after_steps_mb": rss("RssAnon") / 1e6,
           "file_after_steps_mb": rss("RssFile") / 1e6,
           "peak_rss_after_setup_mb": peak_setup / 1e6, "peak_rss_mb": peak_rss() / 1e6,
           "full_base_mb": sum(p.numel() * p.element_size()
                               for p in run.model.parameters()) / 1e6}
    # A file per rank: two ranks printing at once can interleave on one line of stdout.
    (Path(out) / f"{mode}-rank{run.dist.rank}.json").write_text(json.dumps(row))
    distributed.finish(run.dist)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quantization", choices=("none", "4bit", "8bit"), default="none")
    ap.add_argument("--modes", default="ddp,fsdp", help="comma-separated train.parallel values")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every run (repeatable)")
    ap.add_argument("--model", default=str(Path(tempfile.gettempdir()) / "adapters-fsdp-llama"))
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"))
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker[0], a.model, a.steps, a.worker[1], a.quantization, a.set)
    model = build(Path(a.model), a.layers, a.hidden)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as out:
        for mode in a.modes.split(","):
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc_per_node=2", __file__, "--model", str(model),
                                "--steps", str(a.steps), "--quantization", a.quantization,
                                *(f"--set={x}" for x in a.set),
                                "--worker", mode, out],
                               env=env, capture_output=True, text=True, cwd=ROOT)
            rows = [json.loads(f.read_text()) for f in Path(out).glob(f"{mode}-rank*.json")]
            if r.returncode or not rows:
                sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
            for row in sorted(rows, key=lambda x: x["rank"]):
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                  for k, v in row.items()}))


if __name__ == "__main__":
    main()
