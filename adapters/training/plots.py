"""Pictures: loss curves (train and eval) from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: Path, out: Path) -> Path | None:
    """loss.png from metrics.jsonl: train loss per step, eval loss where measured."""
    # Here, not at the top: pyplot costs ~0.5 s to import and only the end of a run draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("finite", True)]
    ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / trainable token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
