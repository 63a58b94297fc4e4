"""Eval results into the adapter folder: `adapters eval` rows become the manifest's `eval`
section, and the card is rewritten from it. The weights and their hash are untouched."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from ..adapter import read_manifest, write_manifest
from ..adapter.sections import EvalResult
from ..config import BASE_NAME
from .metrics import HIGHER_IS_BETTER


def _metrics(row: dict) -> dict[str, float]:
    return {k: row[k] for k in (*HIGHER_IS_BETTER, "tokens") if k in row}


def record_eval(folder: str | Path, model_name: str, rows: list[dict]) -> None:
    """Add this adapter's rows (`model_name`'s, the base's beside them) to the manifest and
    the card of `folder`; a folder without a manifest is left as it is."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    base_rows = {r["dataset"]: r for r in rows if r["model"] == BASE_NAME}
    today = dt.date.today().isoformat()
    results = [EvalResult(dataset=r["dataset"], adapter=_metrics(r), date=today,
                          base=_metrics(base_rows[r["dataset"]]) if r["dataset"] in base_rows
                          else None)
               for r in rows if r["model"] == model_name]
    write_manifest(folder, dataclasses.replace(manifest, eval=results))
