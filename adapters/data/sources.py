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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "file.csv:12" (line) or "file.parquet row 3"


def expand(spec: str | list[str]) -> list[Path]:
    """Files named by a path, folder (its data files, sorted) or glob; several with a list."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for s in specs:
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in EXTENSIONS and q.is_file())
            if not found:
                raise DataError(f"{p}: folder has no data files ({', '.join(EXTENSIONS)})")
            files += found
        elif any(c in s for c in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True))
            if not found:
                raise DataError(f"{s}: the pattern matches no file")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: data file not found")
    for f in files:
        if f.suffix not in EXTENSIONS:
            raise DataError(f"{f}: unknown extension {f.suffix!r}; expected one of "
                            f"{', '.join(EXTENSIONS)}")
    return files


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
    import pyarrow.parquet as pq

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


def _looks_like_hub_id(spec: str) -> bool:
    return (isinstance(spec, str) and spec.count("/") == 1 and not Path(spec).exists()
            and not spec.startswith((".", "/", "~")) and Path(spec).suffix == "")


def read_hub(name: str, split: str = "train") -> list[Row]:
    """A dataset from the hub; offline this fails at once with a clear error, never hangs."""
    import os

    import datasets

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(f"{name}: hub datasets need a network; HF_HUB_OFFLINE is set. "
                        "Download it elsewhere and point data.train at the local files")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network and hub errors come in many types
        raise DataError(f"{name}: not a local file and could not be loaded from the hub "
                        f"({type(e).__name__}: {str(e)[:200]})") from e
    return [Row(r, f"{name} row {i}") for i, r in enumerate(ds)]


def read_rows(spec: str | list[str], text_unit: str = "line") -> tuple[list[Row], list[Path]]:
    """All rows of a data spec, in file order, and the files they came from."""
    if isinstance(spec, str) and _looks_like_hub_id(spec):
        return read_hub(spec), []
    files = expand(spec)
    rows: list[Row] = []
    for f in files:
        rows += read_file(f, text_unit)
    return rows, files
