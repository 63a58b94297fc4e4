"""Typed JSON: dataclasses read field by field from parsed JSON, and written back.

`parse(cls, data, source, fix)` checks each known field against its type hint (str, int,
float, bool, Any, lists, dicts, unions, nested dataclasses) and raises one AdapterFileError
naming the source and the field's path (`base.fingerprint.probe.x[0]`); keys a dataclass does
not declare go to its `extra` dict, and `to_json` folds them back in, so newer files survive a
round trip through older code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import stat
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import AdapterFileError

MAX_JSON_BYTES = 16 << 20  # an adapter's config, manifest or card: far below this


def read_json(path: Path, missing: str = "", limit: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of `path`, a regular file of at most `limit` bytes; AdapterFileError
    naming the file otherwise (`missing` says what to do when it is absent)."""
    try:  # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: missing{'; ' + missing if missing else ''}") from None
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AdapterFileError(f"{path}: not a regular file; replace it with the JSON file")
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise AdapterFileError(f"{path}: larger than {limit} bytes; not an adapter's JSON file")
    return loads(raw, str(path))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: bytes, source: str) -> Any:
    """Parsed JSON from bytes; one-line AdapterFileError naming `source` for invalid UTF-8,
    invalid JSON, NaN/Infinity, integers too long to convert, or nesting too deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{source}: not valid JSON (invalid UTF-8 at byte offset "
                               f"{e.start}); save it as UTF-8") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column "
                               f"{e.colno})") from None
    except RecursionError:
        raise AdapterFileError(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # NaN / Infinity, or an integer of thousands of digits
        raise AdapterFileError(f"{source}: not valid JSON ({str(e)[:100]})") from None


class _Mismatch(Exception):
    """A value of the wrong type at `where` (becomes an AdapterFileError naming the field)."""

    def __init__(self, where: str, expected: str, value: Any):
        super().__init__(where)
        self.where, self.expected, self.value = where, expected, value


class _Absent:
    """Stands for a required key that is not there."""


_ABSENT = _Absent()


def parse(cls, data: dict, source: str, fix: str):
    """`cls` (a dataclass with an `extra` field) from `data`; AdapterFileError naming
    `source` and the field, ending with `fix` (what to do about it)."""
    try:
        return _section(cls, data, "")
    except _Mismatch as m:
        if m.value is _ABSENT:
            got = "it is missing"
        else:
            shown = json.dumps(m.value, default=str)
            got = f"got {kind(m.value)} {shown if len(shown) <= 40 else shown[:37] + '...'}"
        raise AdapterFileError(f"{source}: field '{m.where}' must be {m.expected}, {got}; "
                               f"{fix}") from None


def _section(cls, data: dict, where: str):
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _value(data[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Mismatch(path, _describe(hints[name]), _ABSENT)
    return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _value(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # X | None: X's own message, with the inner field's name
            return _value(value, options[0], where)
        for option in options:
            try:
                return _value(value, option, where)
            except _Mismatch:
                pass
        raise _Mismatch(where, _describe(tp), value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch(where, _describe(tp), value)
        return _section(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch(where, _describe(tp), value)
        return [_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(where, _describe(tp), value)
        return {k: _value(v, args[1], f"{where}.{k}") for k, v in value.items()}
    ok = {str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}[tp]
    if not ok(value):
        raise _Mismatch(where, _describe(tp), value)
    return value


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if dataclasses.is_dataclass(tp):
        names = [f.name for f in dataclasses.fields(tp) if f.name != "extra"]
        return f"an object ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
    if origin is list:
        return f"a list (each {_describe(args[0])})"
    if origin is dict:
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            Any: "a value"}[tp]


def kind(value: Any) -> str:
    """How a JSON value is called in messages: an object, a list, a string, ..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                         type(value).__name__)


def to_json(value: Any) -> Any:
    """The JSON-ready form of `value`: dataclasses to dicts, their `extra` folded back in."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
               if f.name != "extra"}
        return {**out, **getattr(value, "extra", {})}
    if isinstance(value, (set, frozenset)):
        return sorted(to_json(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value
