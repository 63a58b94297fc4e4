"""Regular expressions from adapter files, matched in bounded time.

peft reads a string `target_modules` (and `exclude_modules`) as a regular expression and
matches it with Python's backtracking `re`, where a pattern such as `(.*.*)*z` runs for hours
on one module name. Here the pattern is parsed by `re`'s own parser (so the syntax is exactly
peft's) and run as a Thompson NFA: every step advances all states at once, so a match costs
at most O(program length x name length) and never backtracks. Back-references, look-arounds,
atomic groups and flags cannot run that way and are refused with the reason; callers hand
peft the list of module names a pattern matched instead of the pattern itself.
"""

from __future__ import annotations

import re
from re import _constants as sre
from re import _parser as sre_parse

from ..errors import AdapterFileError

MAX_PATTERN_CHARS = 2048
MAX_PROGRAM = 4096  # NFA instructions after expanding counted repeats such as a{3,5}
MAX_STEPS = 20_000_000  # state visits over all names matched with one Pattern
_UNSUPPORTED = {sre.GROUPREF: "a back-reference", sre.GROUPREF_EXISTS: "a conditional group",
                sre.ASSERT: "a look-ahead/behind", sre.ASSERT_NOT: "a negative look-around",
                sre.ATOMIC_GROUP: "an atomic group", sre.POSSESSIVE_REPEAT: "a possessive repeat"}
_WORD = re.compile(r"\w")


class PatternError(ValueError):
    """A pattern this matcher refuses; the message says why."""


def _in_class(ch: str, items) -> bool:
    negate, hit = False, False
    for op, av in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            hit = hit or ord(ch) == av
        elif op is sre.RANGE:
            hit = hit or av[0] <= ord(ch) <= av[1]
        elif op is sre.CATEGORY:
            hit = hit or _category(ch, av)
        else:
            raise PatternError(f"character class item {op} is not supported")
    return hit != negate


def _category(ch: str, cat) -> bool:
    tests = {sre.CATEGORY_DIGIT: ch.isdigit, sre.CATEGORY_SPACE: ch.isspace,
             sre.CATEGORY_WORD: lambda: _WORD.match(ch) is not None}
    for positive, test in tests.items():
        if cat is positive:
            return test()
    negatives = {sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT, sre.CATEGORY_NOT_SPACE:
                 sre.CATEGORY_SPACE, sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD}
    if cat in negatives:
        return not _category(ch, negatives[cat])
    raise PatternError(f"category {cat} is not supported")


class Pattern:
    """A compiled pattern; `fullmatch(name)` answers like `re.fullmatch(pattern, name)`."""

    def __init__(self, pattern: str):
        if len(pattern) > MAX_PATTERN_CHARS:
            raise PatternError(f"longer than {MAX_PATTERN_CHARS} characters")
        try:
            parsed = sre_parse.parse(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise PatternError(f"not a valid regular expression ({e})") from None
        if parsed.state.flags & (re.IGNORECASE | re.DOTALL | re.MULTILINE):
            raise PatternError("inline flags such as (?i) are not supported")
        self.pattern, self.steps = pattern, 0
        self.prog: list[tuple] = []
        self._emit(parsed)
        self.prog.append(("match",))

    def _add(self, *instr) -> int:
        if len(self.prog) >= MAX_PROGRAM:
            raise PatternError(f"expands to more than {MAX_PROGRAM} steps (counted repeats)")
        self.prog.append(instr)
        return len(self.prog) - 1

    def _emit(self, seq) -> None:
        for op, av in seq:
            if op in _UNSUPPORTED:
                raise PatternError(f"uses {_UNSUPPORTED[op]}, which cannot be matched in "
                                   "bounded time")
            if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
                self._add("char", op, av)
            elif op is sre.AT:
                self._add("at", av)
            elif op is sre.SUBPATTERN:
                if av[1] or av[2]:
                    raise PatternError("inline flags such as (?i:...) are not supported")
                self._emit(av[3])
            elif op is sre.BRANCH:
                self._branch(av[1])
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # greedy or lazy: same answer
                self._repeat(*av)
            else:
                raise PatternError(f"uses {str(op).lower()}, which is not supported")

    def _branch(self, alternatives) -> None:
        jumps = []
        for alt in alternatives[:-1]:
            split = self._add("split", None, None)
            self._emit(alt)
            jumps.append(self._add("jmp", None))
            self.prog[split] = ("split", split + 1, len(self.prog))
        self._emit(alternatives[-1])
        for j in jumps:
            self.prog[j] = ("jmp", len(self.prog))

    def _repeat(self, low: int, high: int, item) -> None:
        for _ in range(low):
            self._emit(item)
        if high is sre.MAXREPEAT:
            split = self._add("split", None, None)
            self._emit(item)
            self._add("jmp", split)
            self.prog[split] = ("split", split + 1, len(self.prog))
            return
        splits = []
        for _ in range(high - low):
            splits.append(self._add("split", None, None))
            self._emit(item)
        for s in splits:
            self.prog[s] = ("split", s + 1, len(self.prog))

    def _at(self, code, name: str, pos: int) -> bool:
        if code in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
            return pos == 0
        if code is sre.AT_END:
            return pos == len(name) or (pos == len(name) - 1 and name[-1] == "\n")
        if code is sre.AT_END_STRING:
            return pos == len(name)
        if code in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
            before = pos > 0 and _WORD.match(name[pos - 1]) is not None
            after = pos < len(name) and _WORD.match(name[pos]) is not None
            return (before != after) == (code is sre.AT_BOUNDARY)
        raise PatternError(f"anchor {code} is not supported")

    def _closure(self, pcs: list[int], name: str, pos: int) -> list[int]:
        """The consuming states reachable from `pcs` without reading a character."""
        out, seen, stack = [], set(), list(reversed(pcs))
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            self.steps += 1
            instr = self.prog[pc]
            if instr[0] == "jmp":
                stack.append(instr[1])
            elif instr[0] == "split":
                stack += [instr[2], instr[1]]
            elif instr[0] == "at":
                if self._at(instr[1], name, pos):
                    stack.append(pc + 1)
            else:
                out.append(pc)
        if self.steps > MAX_STEPS:
            raise PatternError(f"needs more than {MAX_STEPS} steps to match these names")
        return out

    def _consumes(self, instr: tuple, ch: str) -> bool:
        _, op, av = instr
        if op is sre.LITERAL:
            return ord(ch) == av
        if op is sre.NOT_LITERAL:
            return ord(ch) != av
        if op is sre.ANY:
            return ch != "\n"
        return _in_class(ch, av)

    def fullmatch(self, name: str) -> bool:
        states = self._closure([0], name, 0)
        for pos, ch in enumerate(name):
            nxt = [pc + 1 for pc in states
                   if self.prog[pc][0] == "char" and self._consumes(self.prog[pc], ch)]
            states = self._closure(nxt, name, pos + 1)
            if not states:
                return False
        return any(self.prog[pc][0] == "match" for pc in states)


def compile_pattern(pattern: str, source: str) -> Pattern:
    """`pattern` compiled for bounded matching; AdapterFileError naming `source` (the file and
    field) and the reason when it is refused."""
    try:
        return Pattern(pattern)
    except PatternError as e:
        shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
        raise AdapterFileError(f"{source}: pattern {shown!r} refused: {e}; list the module "
                               "names instead (e.g. [\"q_proj\", \"v_proj\"])") from None


def select(pattern: str, names, source: str) -> list[str]:
    """The names `pattern` matches in full (as peft's `re.fullmatch`), in bounded time."""
    compiled = compile_pattern(pattern, source)
    try:
        return [n for n in names if compiled.fullmatch(n)]
    except PatternError as e:
        raise AdapterFileError(f"{source}: pattern {pattern[:60]!r} refused: {e}; list the "
                               "module names instead") from None
