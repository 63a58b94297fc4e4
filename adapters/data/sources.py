"""Read rows from local files (jsonl, json, csv, tsv, parquet, txt), folders, globs, or the hub.

Every row carries where it came from (file, line or row number), so later errors can point
at it. Parsing is strict: a malformed line, invalid UTF-8 or a ragged CSV row is an error
that names the file, the line and, for bad bytes, the byte offset.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import json
import os
import random
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from ..config import HUB_ID, DataConfig
from ..errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
_TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads its boolean variables
# One record (a JSONL, CSV or text line) may hold at most this many characters: far above
# any training example, far below what would exhaust memory while it is parsed.
MAX_LINE_CHARS = 4 << 20
MAX_COLUMNS = 10_000


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "file.csv:12" (line) or "file.parquet row 3"


def is_hub_id(spec: str) -> bool:
    """`owner/name` that is no local path and has no data-file extension: a hub dataset id.

    `data/qa.csv` that does not exist stays a missing file (its extension says so).
    """
    return (isinstance(spec, str) and HUB_ID.fullmatch(spec) is not None
            and not Path(spec).expanduser().exists()
            and Path(spec).suffix not in EXTENSIONS)


def hub_offline() -> bool:
    """True when the environment forbids the hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _specs(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def _not_regular(path: Path) -> str | None:
    """What `path` is when it is not a regular file ("a folder", "a FIFO", ...), else None."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)",
             stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def _refuse_irregular(path: Path, why: str) -> DataError:
    return DataError(f"{path}: {why}, not a regular file; only regular files are read as "
                     "data (name the files, or a folder of them)")


def _local_files(s: str) -> list[Path]:
    """The files one local spec (a path, folder or glob) names; a DataError if none, or if
    one it names is not a regular file (a folder inside a glob, a FIFO, a device)."""
    p = Path(s).expanduser()
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.suffix in EXTENSIONS and not q.is_dir())
        if not files:
            raise DataError(f"{p}: folder has no data files ({', '.join(EXTENSIONS)})")
    elif any(c in s for c in "*?["):
        files = sorted(Path(q) for q in glob.glob(str(p), recursive=True))
        if not files:
            raise DataError(f"{s}: the pattern matches no file")
    elif p.exists():
        files = [p]
    else:
        raise DataError(f"{p}: data file not found")
    for f in files:
        why = _not_regular(f)
        if why is not None:
            raise _refuse_irregular(f, why)
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


def _open(path: Path) -> io.BufferedReader:
    """`path` opened for reading in binary; DataError unless it is a regular file. O_NONBLOCK:
    a FIFO put in place after the glob was checked is refused instead of waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise _refuse_irregular(path, _not_regular(path) or "not a regular file")
    return f


def _utf8_error(path: Path) -> DataError:
    """The file:line and byte offset of the first invalid UTF-8 byte, found by streaming."""
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with _open(path) as f:
        while block := f.read(1 << 16):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                bad = offset + e.start
                line += block[:e.start].count(b"\n")
                return DataError(f"{path}:{line}: invalid UTF-8 at byte offset {bad} "
                                 f"({block[e.start:e.start + 4]!r}); save the file as UTF-8")
            offset, line = offset + len(block), line + block.count(b"\n")
    return DataError(f"{path}: invalid UTF-8 at its end; save the file as UTF-8")


def _decode(path: Path) -> str:
    with _open(path) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _utf8_error(path) from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its ending) of a UTF-8 text file, streamed: a line is never
    held beyond MAX_LINE_CHARS characters, so one huge record cannot exhaust memory."""
    with _open(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
        n = 0
        while True:
            try:
                line = f.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError:
                raise _utf8_error(path) from None
            if not line:
                return
            n += 1
            if len(line) > MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
                raise DataError(f"{path}:{n}: line longer than {MAX_LINE_CHARS} characters "
                                f"(it starts {line[:50]!r}...); one record may be at most that "
                                "long (split or shorten it)")
            yield n, line


def _json(text: str, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}){what}") from e
    except RecursionError:
        raise DataError(f"{where}: malformed JSON (nested too deeply){what}") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise DataError(f"{where}: malformed JSON ({str(e)[:100]}){what}") from None


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    for n, line in _lines(path):
        if not line.strip():
            continue
        obj = _json(line, f"{path}:{n}", "; each line must be one JSON object")
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append(Row(obj, f"{path}:{n}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = _decode(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    except (RecursionError, ValueError):
        obj = _json(text, str(path), "")  # the same error, as one line
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return [Row(r, f"{path} item {i}") for i, r in enumerate(obj)]


def _columns(header: list[str]) -> str:
    """The header for a message: the first few names, never megabytes of them."""
    shown = ", ".join(h[:40] for h in header[:5])
    return shown + (f", ... ({len(header)} columns)" if len(header) > 5 else "")


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    reader = csv.reader((line for _, line in _lines(path)), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed header ({e})") from e
    if len(header) > MAX_COLUMNS:
        raise DataError(f"{path}:1: the header has {len(header)} columns ({_columns(header)}); "
                        f"at most {MAX_COLUMNS} are read (is the delimiter {delimiter!r} right?)")
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
                            f"{len(header)} ({_columns(header)}); quote fields that contain "
                            f"{delimiter!r}")
        rows.append(Row(dict(zip(header, values)), f"{path}:{reader.line_num}"))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    _open(path).close()  # a regular file, or a clear DataError
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read parquet ({e})") from e
    return [Row(r, f"{path} row {i}") for i, r in enumerate(table.to_pylist())]


def _read_txt(path: Path, unit: str) -> list[Row]:
    if unit == "file":
        text = _decode(path)
        return [Row({"text": text}, str(path))] if text.strip() else []
    return [Row({"text": part}, f"{path}:{n}")
            for n, line in _lines(path) for part in line.splitlines() if part.strip()]


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


def check_data(cfg: DataConfig) -> None:
    """Fail now, reading no rows, when `data.train` or `data.eval` names nothing readable
    (a missing file, an empty folder, a hub id while offline): run it before a model loads."""
    for name in ("train", "eval"):
        spec = getattr(cfg, name)
        if spec is not None:
            try:
                check_sources(spec)
            except DataError as e:
                raise DataError(f"data.{name}: {e}") from None


def split_rows(cfg: DataConfig, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train rows, eval rows) a recipe's `data` names: data.eval's, or data.eval_fraction of
    data.train held out by a shuffle of `seed` ([] when neither is set)."""
    if cfg.train is None:
        raise DataError("data.train: no training data given (a file, folder, glob or list)")
    check_data(cfg)  # a missing eval file fails before the train files are read
    rows, _ = read_rows(cfg.train, cfg.text_unit)
    if cfg.eval is not None:
        return rows, read_rows(cfg.eval, cfg.text_unit)[0]
    if cfg.eval_fraction <= 0:
        return rows, []
    if not 0 < cfg.eval_fraction < 1:
        raise DataError(f"data.eval_fraction: must be between 0 and 1, got {cfg.eval_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(len(rows) * cfg.eval_fraction))])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])
