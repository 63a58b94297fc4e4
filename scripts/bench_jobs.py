#!/usr/bin/env python
"""Benchmark: N adapters trained in one pass on one base vs the N runs one after another.

Like with like: the same N recipes (a sweep of lora.r x train.lr on the pydoc Q&A data), the
same steps, batch, rows, dtype and switches on both sides. Each side is real `adapters train`
processes: "one pass" is one process with a `jobs:` recipe, "one by one" is N processes run
one after another. Sides interleave, repeated. Figures per repeat:
  wall      the whole command(s), loading the base included (what a user waits)
  steps     the training steps alone (the sum of metrics.jsonl's step seconds; one pass: of
            its stacked steps), so loading is left out on both sides
  peak      the peak RSS of the process (one by one: the largest of the N; N processes side
            by side would hold N times that)
Prints min / median / max and the ratios of medians (one pass / one by one).

  .venv/bin/python scripts/bench_jobs.py                 # 4 jobs, default model, 3 repeats
  .venv/bin/python scripts/bench_train.py --jobs         # the same, from the main benchmark
  scripts/gpu_check.sh                                   # on a lent GPU: 1B shape, QLoRA
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GRID = [(8, 1e-4), (8, 3e-4), (16, 1e-4), (16, 3e-4)]  # (lora.r, train.lr) per job


def recipes(model: str, data: dict, a, out: Path) -> tuple:
    """(the one-pass recipe, the N recipes of the one-by-one side)."""
    common = {"model": {"name": model, "dtype": "bf16", "quantization": a.quantization},
              "data": data, "lora": {"alpha": 32},
              "train": {"steps": a.steps, "batch_size": a.batch, "schedule": "constant",
                        "seed": 0, "log_every": 1,
                        "gradient_checkpointing": a.checkpointing}}
    one = {"jobs_per_forward": a.per_forward}  # the one-pass side's only extra key
    n = a.jobs
    jobs = [{"name": f"r{r}-lr{lr:g}", "lora": {"r": r}, "train": {"lr": lr}}
            for r, lr in GRID[:n]]
    one_pass = {**common, "output": {"dir": str(out / "pass")}, "jobs": jobs,
                "train": {**common["train"], **one}}
    alone = []
    for job in jobs:
        cfg = json.loads(json.dumps(common))
        cfg["lora"].update(job["lora"])
        cfg["train"].update(job["train"])
        cfg["output"] = {"dir": str(out / "alone" / job["name"])}
        alone.append(cfg)
    return one_pass, alone


def run(recipe: dict, path: Path, extra: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one `adapters train` process on `recipe`."""
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "adapters", "train", str(path), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (not all children's)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{path} failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def step_seconds(folders: list[Path], stacked: bool) -> float:
    """Training-step time from metrics.jsonl: one pass shares its steps, so count each once."""
    per_step: dict[int, float] = {}
    total = 0.0
    for f in folders:
        for line in (f / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "seconds" in r:
                if stacked:
                    per_step[r["step"]] = r["seconds"]
                else:
                    total += r["seconds"]
    return sum(per_step.values()) if stacked else total


def device_peak(folders: list[Path]) -> int:
    """The largest peak_memory_bytes the runs' manifests record (CUDA: device memory)."""
    peaks = [json.loads((f / "manifest.json").read_text()).get("training", {}).get(
        "peak_memory_bytes", 0) for f in folders if (f / "manifest.json").exists()]
    return max(peaks, default=0)


def one_repeat(model, data, a, work: Path, i: int) -> dict:
    out = work / f"rep{i}"
    shutil.rmtree(out, ignore_errors=True)  # each repeat trains afresh
    one_pass, alone = recipes(model, data, a, out)
    sides = {}
    order = ("one pass", "one by one") if i % 2 == 0 else ("one by one", "one pass")
    for side in order:  # interleaved: the first side alternates between repeats
        if side == "one pass":
            wall, peak = run(one_pass, out.with_suffix(".pass.yaml"), ["--no-compare"])
            folders = [Path(one_pass["output"]["dir"]) / j["name"] for j in one_pass["jobs"]]
            sides[side] = {"wall": wall, "peak": peak, "steps": step_seconds(folders, True),
                           "device_peak": device_peak(folders)}
        else:
            walls, peaks = [], []
            for k, cfg in enumerate(alone):
                w, p = run(cfg, out.with_suffix(f".alone{k}.yaml"), [])
                walls.append(w)
                peaks.append(p)
            folders = [Path(c["output"]["dir"]) for c in alone]
            sides[side] = {"wall": sum(walls), "peak": max(peaks),
                           "steps": step_seconds(folders, False),
                           "device_peak": device_peak(folders)}
        print(f"  repeat {i + 1} {side}: wall {sides[side]['wall']:.1f} s, steps "
              f"{sides[side]['steps']:.1f} s, peak {sides[side]['peak'] / 1e9:.2f} GB",
              flush=True)
    return sides


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    v = [x / scale for x in values]
    return "/".join(fmt.format(x) for x in (min(v), statistics.median(v), max(v)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=4, choices=range(2, len(GRID) + 1))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpointing", action="store_true",
                   help="train.gradient_checkpointing on both sides (activations recomputed)")
    p.add_argument("--per-forward", type=int, default=0,
                   help="train.jobs_per_forward of the one pass (0: auto, 1 on CPU); "
                        "--per-forward 4 stacks all four")
    p.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--gpu", action="store_true",
                   help="on CUDA: also the device peak and the tokens/s ratio "
                        "(scripts/gpu_check.sh)")
    p.add_argument("--model-path", help="a model folder (default: the embedded SmolLM2 135M)")
    p.add_argument("--out", default="runs/bench-jobs")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_train_sides import data_cfg

    from adapters.model import default_model_dir

    work = ROOT / a.out
    work.mkdir(parents=True, exist_ok=True)
    model = a.model_path or str(default_model_dir())
    data = {**data_cfg("b-padded", work, build=True), "max_seq_len": a.seq}
    print(f"# {a.jobs} jobs (lora.r x train.lr: {GRID[:a.jobs]}), {a.steps} steps each, batch "
          f"{a.batch} x <= {a.seq} tokens of pydoc Q&A, packed, bf16, quantization "
          f"{a.quantization}, gradient checkpointing {'on' if a.checkpointing else 'off'}, "
          f"jobs per forward {a.per_forward or 'auto'} (one pass), "
          "the same recipes on both "
          f"sides; one pass = one `adapters train` with jobs:, one by one = {a.jobs} processes "
          f"in a row; {a.repeats} interleaved repeats; min/median/max", flush=True)
    reps = [one_repeat(model, data, a, work, i) for i in range(a.repeats)]
    med = {s: {k: statistics.median(r[s][k] for r in reps) for k in ("wall", "steps", "peak")}
           for s in reps[0]}
    lines = ["| side | wall s | steps s | peak GB |", "|---|---|---|---|"]
    for s in ("one pass", "one by one"):
        lines.append(f"| {s} | {spread([r[s]['wall'] for r in reps])} | "
                     f"{spread([r[s]['steps'] for r in reps])} | "
                     f"{spread([r[s]['peak'] for r in reps], 1e9, '{:.2f}')} |")
    ratio = {k: med["one pass"][k] / med["one by one"][k] for k in ("wall", "steps", "peak")}
    if a.gpu:  # device memory from the manifests; throughput: the same tokens on both sides
        dev = {side: statistics.median(r[side]["device_peak"] for r in reps) for side in med}
        lines += [f"CUDA: peak device memory {dev['one pass'] / 1e9:.2f} GB one pass, "
                  f"{dev['one by one'] / 1e9:.2f} GB one job; tokens/s one pass / one by one "
                  f"{1 / ratio['steps']:.2f}x (target >= 1.3x)"]
    lines += ["", f"one pass / one by one (medians): wall {ratio['wall']:.2f}x, steps "
              f"{ratio['steps']:.2f}x, peak memory {ratio['peak']:.2f}x of one run "
              f"({med['one pass']['peak'] / (a.jobs * med['one by one']['peak']):.2f}x of "
              f"{a.jobs} runs side by side)"]
    text = "\n".join(lines)
    print("\n" + text)
    (work / "report.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
