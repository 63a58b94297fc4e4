"""GRPO's rewards: one number per completion, from built-in checks or a user's function.

`grpo.rewards` names built-ins or `module:function`; each is called as TRL calls its reward
functions, `fn(prompts, completions, completion_ids=..., **columns) -> list[float]` (one list
per column, a value per completion), so a function written for TRL works here unchanged if it
scores every completion (TRL's None, "cannot score", is refused with the row). The
step's reward is the weighted sum (`grpo.reward_weights`, default 1 each). A function that
raises, returns the wrong number of values or a value that is not a finite number fails the
step with the reward's name and the data row, never a traceback from deep inside.

Built-in (the reference is the row's `grpo.reference` column, default its answer):
  exact_match     1 when the completion equals the reference (SQuAD normalisation), else 0
  token_f1        token F1 of completion against reference (SQuAD normalisation)
  python_parses   1 when the completion, or its first fenced ``` block, is valid Python
                  (`ast.parse` only: nothing is ever executed)
  json_schema     1 when the completion (or its fenced block) is JSON valid against
                  `grpo.json_schema` (any JSON when no schema is given)
  length_penalty  -(completion tokens / grpo.max_completion_length): shorter is better
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass

import jsonschema

from ..config import GrpoConfig
from ..errors import ConfigError, TrainingError
from ..eval.metrics import exact_match as _exact
from ..eval.metrics import token_f1 as _f1

FENCE = re.compile(r"```[\w+-]*\n(.*?)(?:```|$)", re.S)


def _body(text: str) -> str:
    """The first fenced block of a completion, or the whole completion."""
    m = FENCE.search(text)
    return m.group(1) if m else text


def _reference(columns: dict, n: int, key: str) -> list[str]:
    values = columns.get(key)
    if values is None:
        raise KeyError(f"no column {key!r} (grpo.reference) in the data; columns: "
                       f"{sorted(columns)}")
    return ["" if v is None else str(v) for v in values][:n]


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _valid_json(text: str, schema: dict | None) -> bool:
    try:
        value = json.loads(_body(text))
    except (ValueError, RecursionError):
        return False
    if schema is None:
        return True
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def builtins(g: GrpoConfig) -> dict[str, Callable]:
    """The built-in rewards, bound to the recipe's settings."""
    ref = g.reference

    def exact_match(prompts, completions, **cols):
        return [_exact(c, r) for c, r in zip(completions, _reference(cols, len(completions), ref))]

    def token_f1(prompts, completions, **cols):
        return [_f1(c, r) for c, r in zip(completions, _reference(cols, len(completions), ref))]

    def python_parses(prompts, completions, **cols):
        return [float(bool(_body(c).strip()) and _parses(_body(c))) for c in completions]

    def json_schema(prompts, completions, **cols):
        return [float(_valid_json(c, g.json_schema)) for c in completions]

    def length_penalty(prompts, completions, completion_ids=(), **cols):
        return [-len(ids) / g.max_completion_length for ids in completion_ids]

    return {f.__name__: f for f in (exact_match, token_f1, python_parses, json_schema,
                                    length_penalty)}


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float


def resolve(g: GrpoConfig) -> list[Reward]:
    """The recipe's rewards with their weights; an unknown name fails before the model loads."""
    if not g.rewards:
        raise ConfigError("grpo.rewards: name at least one reward: "
                          f"{', '.join(builtins(g))}, or module:function")
    weights = g.reward_weights if g.reward_weights is not None else [1.0] * len(g.rewards)
    if len(weights) != len(g.rewards):
        raise ConfigError(f"grpo.reward_weights: {len(weights)} weight(s) for "
                          f"{len(g.rewards)} reward(s)")
    if g.json_schema is not None:
        try:
            jsonschema.Draft202012Validator.check_schema(g.json_schema)
        except jsonschema.SchemaError as e:
            raise ConfigError(f"grpo.json_schema: not a valid JSON schema: {e.message}") from None
    known = builtins(g)
    out = []
    for name, w in zip(g.rewards, weights):
        if name in known:
            out.append(Reward(name, known[name], float(w)))
            continue
        module, _, attr = name.partition(":")
        if not attr:
            raise ConfigError(f"grpo.rewards: {name!r} is neither a built-in reward "
                              f"({', '.join(known)}) nor module:function")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"grpo.rewards: cannot load {name!r}: {e}") from None
        if not callable(fn):
            raise ConfigError(f"grpo.rewards: {name!r} is not callable")
        out.append(Reward(name, fn, float(w)))
    return out


def _failing_row(r: Reward, prompts, completions, completion_ids, columns) -> int | None:
    """The first row the reward fails on alone (None when each passes alone)."""
    for i in range(len(completions)):
        try:
            r.fn(prompts[i:i + 1], completions[i:i + 1], completion_ids=completion_ids[i:i + 1],
                 **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:
            return i
    return None


def score(rewards: list[Reward], prompts: list[str], completions: list[str],
          completion_ids: list[list[int]], columns: dict[str, list],
          where: list[str]) -> list[list[float]]:
    """(completions, rewards) values; a bad reward raises TrainingError naming it and the row."""
    table = []
    for r in rewards:
        try:
            values = list(r.fn(prompts, completions, completion_ids=completion_ids, **columns))
        except Exception as e:
            row = _failing_row(r, prompts, completions, completion_ids, columns)
            at = where[row] if row is not None else f"the batch starting at {where[0]}"
            raise TrainingError(f"reward {r.name!r} failed on the completion of {at}: "
                                f"{type(e).__name__}: {e}") from e
        if len(values) != len(completions):
            raise TrainingError(f"reward {r.name!r} returned {len(values)} values for "
                                f"{len(completions)} completions (rows from {where[0]})")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise TrainingError(f"reward {r.name!r} returned {v!r} for the completion of "
                                    f"{where[i]}: expected a finite number")
        table.append([float(v) for v in values])
    return [list(col) for col in zip(*table)]
