"""Read rows from local files (jsonl, json, csv, tsv, parquet, txt), folders, globs, or the hub.

Every row carries where it came from (file, line or row number), so later errors can point
at it. Parsing is strict: a malformed line, invalid UTF-8 or a ragged CSV row is an error
that names the file, the line and, for bad bytes, the byte offset.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from ..errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name
_TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads its boolean variables


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "file.csv:12" (line) or "file.parquet row 3"


def is_hub_id(spec: str) -> bool:
    """`owner/name` that is no local path and has no data-file extension: a hub dataset id.

    `data/qa.csv` that does not exist stays a missing file (its extension says so).
    """
    return (isinstance(spec, str) and _HUB_ID.fullmatch(spec) is not None
            and not Path(spec).expanduser().exists()
            and Path(spec).suffix not in EXTENSIONS)


def hub_offline() -> bool:
    """True when the environment forbids the hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _specs(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def _local_files(s: str) -> list[Path]:
    """The files one local spec (a path, folder or glob) names; a DataError if none."""
    p = Path(s).expanduser()
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.suffix in EXTENSIONS and q.is_file())
        if not files:
            raise DataError(f"{p}: folder has no data files ({', '.join(EXTENSIONS)})")
    elif any(c in s for c in "*?["):
        files = sorted(Path(q) for q in glob.glob(str(p), recursive=True))
        if not files:
            raise DataError(f"{s}: the pattern matches no file")
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{p}: data file not found")
    for f in files:
        if f.suffix not in EXTENSIONS:
            raise DataError(f"{f}: unknown extension {f.suffix!r}; expected one of "
                            f"{', '.join(EXTENSIONS)}")
    return files


def expand(spec: str | list[str]) -> list[Path]:
    """Local files named by a path, folder (its data files, sorted) or glob; several with a list.

    A hub dataset id names no local file and adds none (`read_rows` loads it from the hub).
    """
    return [f for s in _specs(spec) if not is_hub_id(s) for f in _local_files(s)]


def _offline_error(name: str) -> DataError:
    return DataError(
        f"{name}: not a local file or folder, so it is read as a hub dataset id, but the hub "
        "is offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set). Unset it, or download "
        f"the dataset where there is a network (datasets.load_dataset({name!r}).to_json(...)) "
        "and use the local file instead")


def check_sources(spec: str | list[str]) -> None:
    """Fail now, without reading rows, when a data spec names nothing that can be read:
    a missing file, an empty folder or glob, a bad extension, or a hub id while offline.

    Callers run it before loading a model, so such a mistake costs no model load.
    """
    for s in _specs(spec):
        if not is_hub_id(s):
            _local_files(s)
        elif hub_offline():
            raise _offline_error(s)


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte offset {e.start} "
                        f"({raw[e.start:e.start + 4]!r}); save the file as UTF-8") from e


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    for n, line in enumerate(_decode(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append(Row(obj, f"{path}:{n}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads(_decode(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return [Row(r, f"{path} item {i}") for i, r in enumerate(obj)]


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    text = _decode(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed header ({e})") from e
    rows = []
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
        if not values:
            continue
        if len(values) != len(header):
            raise DataError(f"{path}:{reader.line_num}: {len(values)} fields, the header has "
                            f"{len(header)} ({', '.join(header)}); quote fields that contain "
                            f"{delimiter!r}")
        rows.append(Row(dict(zip(header, values)), f"{path}:{reader.line_num}"))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read parquet ({e})") from e
    return [Row(r, f"{path} row {i}") for i, r in enumerate(table.to_pylist())]


def _read_txt(path: Path, unit: str) -> list[Row]:
    text = _decode(path)
    if unit == "file":
        return [Row({"text": text}, str(path))] if text.strip() else []
    return [Row({"text": line}, f"{path}:{n}")
            for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_file(path: Path, text_unit: str = "line") -> list[Row]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if path.suffix == ".tsv" else ",")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    return _read_txt(path, text_unit)


def read_hub(name: str, split: str = "train") -> list[Row]:
    """A dataset from the hub; offline this fails at once with a clear error, never hangs."""
    if hub_offline():
        raise _offline_error(name)
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network and hub errors come in many types
        raise DataError(f"{name}: not a local file and could not be loaded from the hub "
                        f"({type(e).__name__}: {str(e)[:200]})") from e
    return [Row(dict(r), f"{name} row {i}") for i, r in enumerate(ds)]


def read_rows(spec: str | list[str], text_unit: str = "line") -> tuple[list[Row], list[Path]]:
    """All rows of a data spec, in order, and the local files they came from.

    Each entry is a local path, folder or glob, or an `owner/name` hub dataset id.
    """
    rows: list[Row] = []
    files: list[Path] = []
    for s in _specs(spec):
        if is_hub_id(s):
            rows += read_hub(s)
            continue
        for f in _local_files(s):
            rows += read_file(f, text_unit)
            files.append(f)
    return rows, files
