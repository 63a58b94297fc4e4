"""Real datasets built from what every machine has: the Python standard library.

- pydoc-qa (prompt_completion, an `input`/`output` CSV): a question about a public stdlib
  function or class with its signature -> the first paragraph of its docstring;
- stdlib-code (text, JSONL): source files of stdlib modules.

Both are deterministic and held out by module: a module is in eval or in train, never both,
so evaluation never sees the modules the adapter was trained on.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import io
import json
from pathlib import Path

from ..io import atomic_write_text

# Pure-Python modules that import without side effects (no `this`, `antigravity`, GUI).
MODULES = sorted("""
abc argparse ast base64 bisect calendar cmd codecs collections colorsys configparser
contextlib copy csv dataclasses datetime decimal difflib dis email enum filecmp fnmatch
fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html http imaplib
inspect ipaddress json keyword linecache locale logging lzma mailbox mimetypes netrc
numbers operator optparse os pathlib pickle pkgutil platform poplib pprint queue quopri
random re reprlib sched secrets selectors shelve shlex shutil signal smtplib socket
socketserver statistics string stringprep struct subprocess tarfile tempfile textwrap
threading timeit token tokenize trace traceback types typing uuid warnings wave weakref
zipfile zipimport
""".split())


def is_eval_module(name: str, eval_share: int = 5) -> bool:
    """About 1 module in `eval_share` is held out, chosen by a stable hash of its name."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % eval_share == 0


def _first_paragraph(doc: str, limit: int = 400) -> str:
    para = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()
    return para if len(para) <= limit else para[:limit].rsplit(" ", 1)[0] + " ..."


class _Elided:
    def __repr__(self) -> str:
        return "..."


def _stable(param: inspect.Parameter) -> inspect.Parameter:
    """A default whose repr shows live state (`<object object at 0x7f...>`, a list of the
    process's logging handlers) is shown as `...`: the dataset must be the same wherever and
    whenever it is built."""
    if param.default is not param.empty and "<" in repr(param.default):
        return param.replace(default=_Elided())
    return param


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
        return str(sig.replace(parameters=[_stable(p) for p in sig.parameters.values()]))
    except (TypeError, ValueError):
        return "(...)"


def pydoc_rows(module_name: str) -> list[dict[str, str]]:
    mod = importlib.import_module(module_name)
    rows = []
    for name in sorted(getattr(mod, "__all__", None) or dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        home = getattr(obj, "__module__", None) or module_name
        if home.lstrip("_").split(".")[0] != module_name.split(".")[0]:
            continue  # re-exported from elsewhere
        doc = inspect.getdoc(obj)
        if not doc or len(doc) < 20:
            continue
        kind = "class" if inspect.isclass(obj) else "function"
        rows.append({"input": f"What does the {kind} `{module_name}.{name}{_signature(obj)}` do?",
                     "output": _first_paragraph(doc), "module": module_name})
    return rows


def code_rows(module_name: str, max_chars: int = 12_000) -> list[dict[str, str]]:
    mod = importlib.import_module(module_name)
    path = getattr(mod, "__file__", None)
    if not path or not path.endswith(".py"):
        return []
    text = Path(path).read_text(encoding="utf-8")[:max_chars]
    return [{"text": text, "module": module_name}]


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["input", "output", "module"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def build_pydoc_qa(out: Path, max_rows: int | None = None) -> dict[str, Path]:
    """Write train.csv and eval.csv (columns input, output, module); returns their paths."""
    train, ev = [], []
    for m in MODULES:
        (ev if is_eval_module(m) else train).extend(pydoc_rows(m))
    if max_rows:
        train, ev = train[:max_rows], ev[:max(1, max_rows // 4)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train.csv", _csv_text(train))
    atomic_write_text(out / "eval.csv", _csv_text(ev))
    return {"train": out / "train.csv", "eval": out / "eval.csv"}


def build_stdlib_code(out: Path, max_chars: int = 12_000, eval_chars: int = 4_000
                      ) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl ({"text", "module"} per source file).

    Eval files are cut shorter (`eval_chars`): held-out loss needs a sample, not every line,
    and evaluation runs several times per training run.
    """
    train, ev = [], []
    for m in MODULES:
        if is_eval_module(m):
            ev.extend(code_rows(m, eval_chars))
        else:
            train.extend(code_rows(m, max_chars))
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", ev)):
        atomic_write_text(out / f"{name}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}
