"""YAML read safely: plain values only, bounded depth and size, one-line errors.

`load_yaml(text, source)` is yaml.safe_load (no tag ever builds an object) with two bounds
checked on the composed node graph, before any Python object exists: nesting depth, and the
number of values once every alias is expanded, so a "billion laughs" alias bomb is refused in
milliseconds instead of running to MemoryError. Every error is one ConfigError line naming
the source and, when YAML knows it, the line and column.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError

# A recipe is a few sections of a few keys: these are far above any real one.
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # counted with every alias expanded (an alias bomb stops here)


class _Refused(yaml.YAMLError):
    """YAML that parses but is refused (too deep, too large once aliases are expanded)."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain values only, no tags that build objects) that refuses nesting
    deeper than MAX_YAML_DEPTH and documents larger than MAX_YAML_NODES nodes with every
    alias expanded, before any Python object is built."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_YAML_DEPTH:
            raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # beyond Python's limit on digits converted (4300)
            raise _NotAValue(problem=f"an integer of {len(node.value)} digits; no setting "
                                     "takes one that long", problem_mark=node.start_mark) \
                from None


class _NotAValue(yaml.MarkedYAMLError):
    """A plain scalar Python refuses to build (an integer of thousands of digits)."""


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _expanded_size(node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes under `node` with aliases expanded; an alias is counted once per use, each node
    computed once (memo), so a billion-node bomb costs only its few distinct nodes."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise _Refused("an alias refers to a node that contains it (a recursive structure)")
    open_.add(id(node))
    children = node.value if isinstance(node.value, list) else []
    total = 1
    for child in children:
        parts = child if isinstance(child, tuple) else (child,)  # mapping: (key, value)
        total += sum(_expanded_size(c, sizes, open_) for c in parts)
        if total > MAX_YAML_NODES:
            raise _Refused(f"more than {MAX_YAML_NODES} values once its aliases are expanded "
                           "(an alias bomb?)")
    open_.discard(id(node))
    sizes[id(node)] = total
    return total


def load_yaml(text: str, source: str) -> Any:
    """YAML from `text` through the bounded safe loader; one-line ConfigError naming `source`
    (and the line) when it is not valid, uses a tag, or is too deep or too large."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as e:
        raise ConfigError(f"{source}: refused: {e}") from None
    except RecursionError:  # chained aliases nest deeper than Python's stack, not our limit
        raise ConfigError(f"{source}: refused: the YAML nests too deeply once its aliases are "
                          "followed") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        hint = ("; only plain YAML values are read (no tags such as !!python)"
                if isinstance(e, yaml.constructor.ConstructorError) else "")
        problem = " ".join(str(e.problem or e.context or "").split())[:200]
        raise ConfigError(f"{source}: not valid YAML at{where}: {problem}{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())[:200]}") from None
