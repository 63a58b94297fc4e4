"""How one recipe value is checked against its schema field (config.py): its type, its range,
the nearest valid name for a typo, and a short repr for messages."""

from __future__ import annotations

import difflib
import math
import reprlib
import types
import typing
from typing import Any

REPR = reprlib.Repr()  # values in messages: a few items and characters, never megabytes
REPR.maxlevel, REPR.maxlist, REPR.maxdict, REPR.maxstring, REPR.maxother = 2, 4, 4, 60, 60


def range_problem(value: Any, bounds: tuple | None) -> str | None:
    """Why `value` is outside a field's range (None when it is inside, or has no range)."""
    if bounds is None or value is None or isinstance(value, bool):
        return None
    lo, hi, lo_open = bounds
    finite = isinstance(value, int) or math.isfinite(value)  # a huge int has no float form
    inside = finite and (lo < value if lo_open else lo <= value) and value <= hi
    if inside:
        return None
    def show(x):
        return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"
    span = f"> {show(lo)} and <= {show(hi)}" if lo_open else f"in {show(lo)}..{show(hi)}"
    return f"must be a {'whole ' if isinstance(value, int) else ''}number {span}, got " \
           f"{REPR.repr(value)}"


def suggest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(valid)})"


def check_type(value: Any, hint: Any) -> bool:
    """True when `value` fits the type hint (bool is not an int; an int is a float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(check_type(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint)
        return isinstance(value, dict) and all(
            check_type(a, k) and check_type(b, v) for a, b in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def coerce_float(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string and `3` as an int: both are fine for a float field."""
    if hint is not float or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
