"""The report of a multi-job pass (`adapters train` with jobs, `adapters sweep`): what each job
changed, how it trained, every adapter on every job's eval set with the best marked, and the
loss curves overlaid. Written to the pass's folder as report.md, losses.png and eval/."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import BASE_NAME
from ..io import atomic_write_text
from .metrics import HIGHER_IS_BETTER
from .report import write_results


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def varying_keys(recipes: list[dict]) -> list[str]:
    """The recipe keys whose values differ between jobs (output folders left out)."""
    flats = [_flat(r) for r in recipes]
    keys = dict.fromkeys(k for f in flats for k in f)
    return [k for k in keys if k != "output.dir" and len({json.dumps(f.get(k), sort_keys=True)
                                                          for f in flats}) > 1]


def best_table(rows: list[dict], metric: str) -> str:
    """Datasets as rows, models as columns; the best value of each row in bold."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    dsets = list(dict.fromkeys(r["dataset"] for r in rows))
    val = {(r["model"], r["dataset"]): r.get(metric) for r in rows}
    higher = HIGHER_IS_BETTER.get(metric)
    lines = [f"| {metric} ({'higher' if higher else 'lower'} is better) on | " +
             " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for d in dsets:
        got = [val[(m, d)] for m in models if val.get((m, d)) is not None]
        best = (max if higher else min)(got) if got else None
        cells = ["" if val.get((m, d)) is None else
                 (f"**{val[(m, d)]:.4f}**" if val[(m, d)] == best else f"{val[(m, d)]:.4f}")
                 for m in models]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_overlaid(metrics: dict[str, Path], out: Path) -> Path | None:
    """losses.png: each job's train loss per step (lines) and eval loss (dots), one colour each."""
    import matplotlib  # ~1 s to import; only the end of a pass draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    drawn = False
    for name, path in metrics.items():
        if not path.exists():
            continue
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("finite", True)]
        ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        if train:
            (line,) = ax.plot(*zip(*train), lw=1.2, label=name)
            drawn = True
            if ev:
                ax.plot(*zip(*ev), "o", color=line.get_color())
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / trainable token); dots: eval")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def write_jobs_report(folder: Path, names: list[str], outs: list[Path], recipes: list[dict],
                      rows: list[dict] | None, seconds: float) -> Path:
    """report.md in `folder` (see the module docstring); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = varying_keys(recipes)
    lines = [f"# {len(names)} adapters trained in one pass", "",
             f"One base, {len(names)} jobs, {seconds:.0f} s in all (`adapters train` with jobs / "
             "`adapters sweep`). Each job's folder holds its adapter, metrics.jsonl and "
             "loss.png.", "",
             "| job | " + " | ".join(keys) + " | steps | final train loss | eval loss | "
             "tokens/s in the pass | folder |", "|---" * (len(keys) + 6) + "|"]
    for name, out, recipe in zip(names, outs, recipes, strict=True):
        flat = _flat(recipe)
        man = out / "manifest.json"
        tr = (json.loads(man.read_text()).get("training") or {}) if man.exists() else {}
        fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
        state = "" if tr else " (not finished)"
        lines.append(f"| {name}{state} | " + " | ".join(fmt(flat.get(k)) for k in keys) +
                     f" | {fmt(tr.get('steps'))} | {fmt(tr.get('final_train_loss'))} | "
                     f"{fmt(tr.get('final_eval_loss'))} | {fmt(tr.get('tokens_per_s'))} | "
                     f"{out} |")
    if plot_overlaid({n: o / "metrics.jsonl" for n, o in zip(names, outs, strict=True)},
                     folder / "losses.png"):
        lines += ["", "![loss curves](losses.png)"]
    if rows:
        write_results(rows, folder / "eval")
        metrics = [m for m in HIGHER_IS_BETTER if m in rows[0]]
        lines += ["", f"## Every adapter on every job's eval set ({BASE_NAME}: no adapter; "
                  "best of each row in bold)", ""]
        lines += [best_table(rows, m) + "\n" for m in metrics]
        lines += ["![eval](eval/eval.png)"]
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
