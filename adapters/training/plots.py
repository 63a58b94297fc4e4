"""Pictures: loss curves (train and eval) from metrics.jsonl; for GRPO runs, reward curves."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: Path, out: Path) -> Path | None:
    """loss.png from metrics.jsonl: train loss per step, eval loss where measured; a GRPO run
    (rows with `reward`) gets its mean reward per step and eval reward instead."""
    # Here, not at the top: pyplot costs ~0.5 s to import and only the end of a run draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    key, label = ("reward", "mean reward") if any("reward" in r for r in rows) else (
        "loss", "loss (nats / trainable token)")
    train = [(r["step"], r[key]) for r in rows if key in r and r.get("finite", True)]
    ev = [(r["step"], r[f"eval_{key}"]) for r in rows if r.get(f"eval_{key}") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label=f"train {key}", lw=1.2)
    if ev:
        ax.plot(*zip(*ev), "o-", label=f"eval {key}", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
