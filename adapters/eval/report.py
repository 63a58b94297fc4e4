"""Eval rows out: a markdown table per metric, results.json/.csv, a chart, deltas vs a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..config import BASE_NAME
from .metrics import HIGHER_IS_BETTER


def table(rows: list[dict], metric: str = "loss") -> str:
    """Markdown table: datasets as rows, models as columns, with the change vs base."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    dsets = list(dict.fromkeys(r["dataset"] for r in rows))
    val = {(r["model"], r["dataset"]): r[metric] for r in rows}
    arrow = "higher is better" if HIGHER_IS_BETTER.get(metric) else "lower is better"
    lines = [f"| {metric} ({arrow}) | " + " | ".join(models) + " |",
             "|---" * (len(models) + 1) + "|"]
    for d in dsets:
        cells = []
        for m in models:
            v, b = val[(m, d)], val.get((BASE_NAME, d))
            rel = f" ({100 * (v / b - 1):+.1f}%)" if b and m != BASE_NAME else ""
            cells.append(f"{v:.4f}{rel}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], out: Path) -> None:
    """results.json (with samples), results.csv (numbers), eval.png and report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    flat = [{k: v for k, v in r.items() if k != "samples"} for r in rows]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    metrics = [m for m in HIGHER_IS_BETTER if m in flat[0]]
    chart(rows, out / "eval.png", metrics[0] if metrics else "loss")
    lines = ["# Evaluation", ""] + [table(rows, m) + "\n" for m in metrics] + [
        "![chart](eval.png)", ""] + confusion_tables(rows)
    for r in rows:
        for s in r.get("samples", []):
            lines += [f"- **{r['model']}** on {r['dataset']}: {s['prompt'][-120:]!r} -> "
                      f"{s['answer'][:200]!r} (reference {s['reference'][:120]!r})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def confusion_tables(rows: list[dict]) -> list[str]:
    """Each classification row's confusion matrix (rows: true class, columns: predicted)."""
    lines = []
    for r in rows:
        if "confusion" not in r:
            continue
        names = r.get("labels") or [str(i) for i in range(len(r["confusion"]))]
        lines += [f"confusion of {r['model']} on {r['dataset']} (rows: true, columns: "
                  "predicted)", "", "| true \\ predicted | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(str(c) for c in row) + " |"
                  for n, row in zip(names, r["confusion"])]
        lines.append("")
    return lines


def compare(rows: list[dict], old: list[dict]) -> str:
    """Deltas of every shared metric against an earlier results.json."""
    before = {(r["model"], r["dataset"]): r for r in old}
    lines = ["| model | dataset | metric | before | now | delta |", "|---|---|---|---|---|---|"]
    for r in rows:
        prev = before.get((r["model"], r["dataset"]))
        for m in HIGHER_IS_BETTER:
            if prev and m in r and m in prev:
                lines.append(f"| {r['model']} | {r['dataset']} | {m} | {prev[m]:.4f} | "
                             f"{r[m]:.4f} | {r[m] - prev[m]:+.4f} |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, metric: str = "loss") -> Path:
    """A grouped bar chart of `metric`: one group per dataset, one bar per model."""
    # matplotlib takes ~1 s to import and only this function needs it.
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    dsets = list(dict.fromkeys(r["dataset"] for r in rows))
    val = {(r["model"], r["dataset"]): r[metric] for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [j + i * width for j in range(len(dsets))]
        ax.bar(xs, [val[(m, d)] for d in dsets], width, label=m)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(dsets))], dsets)
    better = "higher" if HIGHER_IS_BETTER.get(metric) else "lower"
    ax.set_ylabel(f"held-out {metric} ({better} is better)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
