"""Build the stdlib classification data for recipes/smollm2-pydoc-module.yaml (a task head).

Each row: `text` = a public function, class or method of one of a few stdlib modules with
distinct subjects, as `qualified.name: first paragraph of its docstring`; `label` = the module.
Every label's name (`os.close()` too, in a socket docstring) is replaced by `<module>` in the
text, so no label can be read off it. Classes are balanced (every module keeps as many members
as the smallest has), and each module's members are split train/eval by a stable hash of their
names, so the files are the same on every run of the same Python build.

    python scripts/stdlib_labels.py runs/demo/data/pydoc-module
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import inspect
import io
import re
from pathlib import Path

from adapters.io import atomic_write_text

# Distinct subjects, each with >= 55 documented members on CPython 3.11 / Linux.
MODULES = ("datetime", "logging", "math", "os", "socket")
# Where a module's C parts say they live (`os.getcwd.__module__` is "posix").
HOMES = {"os": {"os", "posix"}}


_SIGNATURE = re.compile(r"[\w.]+\(.*\)( -> .*)?")  # `close()`, `fromtimestamp(t) -> date`


def _paragraph(doc: str, limit: int = 300) -> str:
    """The first paragraph that says more than a C function's signature line."""
    paras = [p.replace("\n", " ").strip() for p in inspect.cleandoc(doc).split("\n\n")]
    para = next((p for p in paras if not _SIGNATURE.fullmatch(p)), paras[0])
    return para if len(para) <= limit else para[:limit].rsplit(" ", 1)[0] + " ..."


def _own(obj, module: str) -> bool:
    home = getattr(obj, "__module__", None) or module
    return home in HOMES.get(module, {module}) or home.lstrip("_") == module


def members(module: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the module's public functions and classes and of those
    classes' public methods, where the docstring has at least 20 characters."""
    mod = importlib.import_module(module)
    out = []
    for name in sorted(dir(mod)):
        obj = getattr(mod, name, None)
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if not _own(obj, module):
            continue  # re-exported from elsewhere
        out.append((name, inspect.getdoc(obj) or ""))
        if inspect.isclass(obj):
            for meth, fn in sorted(vars(obj).items()):
                fn = getattr(fn, "__func__", fn)  # classmethod / staticmethod
                if not meth.startswith("_") and callable(fn):
                    out.append((f"{name}.{meth}", inspect.getdoc(fn) or ""))
    return [(q, d) for q, d in out if len(d) >= 20]


def hide_module(text: str, module: str) -> str:
    """`os.path`, `OS`, `sockets`, `SocketType` -> `<module>...`: the label is not in the text.

    Names of 5 letters or more go wherever they occur, shorter ones (`os`, `math`) only as
    words (not `close`, `aftermath`).
    """
    name = re.escape(module)
    pattern = name if len(module) >= 5 else rf"\b{name}(s\b|\b)"
    return re.sub(f"(?i){pattern}", "<module>", text)


def module_rows(module: str, hidden: tuple[str, ...] = MODULES) -> list[dict[str, str]]:
    """The rows of one module; every name in `hidden` (all the labels) is masked in the text
    (a socket docstring that says `os.close()` would otherwise point at the wrong label)."""
    rows, seen = [], set()
    for qual, doc in members(module):
        text = f"{qual}: {_paragraph(doc)}"
        for name in hidden:
            text = hide_module(text, name)
        if text not in seen:  # e.g. date.ctime and datetime.ctime
            seen.add(text)
            rows.append({"text": text, "label": module, "name": f"{module}.{qual}"})
    return rows


def stable_key(text: str) -> int:
    """A stable shuffle key (Python's hash() changes between runs)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def build(out: Path, per_module: int | None = None, eval_share: float = 0.2,
          modules: tuple[str, ...] = MODULES) -> dict[str, Path]:
    """Write train.csv and eval.csv (columns text, label, name); returns their paths.

    per_module: rows kept per module (default: the smallest module's count, so classes are
    balanced); eval_share of each module's rows go to eval.
    """
    order = lambda r: (stable_key(r["name"]), r["name"])  # noqa: E731
    by_module = {m: sorted(module_rows(m, modules), key=order) for m in modules}
    k = min(len(rows) for rows in by_module.values())
    k = min(k, per_module) if per_module else k
    n_eval = max(1, round(k * eval_share))
    train = [r for rows in by_module.values() for r in rows[n_eval:k]]
    ev = [r for rows in by_module.values() for r in rows[:n_eval]]
    texts = [r["text"] for r in train]
    clash = {r["text"] for r in ev} & set(texts) or {t for t in texts if texts.count(t) > 1}
    if clash:  # the same text under two labels (or in both splits) would be noise
        raise SystemExit(f"duplicate texts across modules or splits: {sorted(clash)[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("train", train), ("eval", ev)):
        rows = sorted(rows, key=lambda r: (stable_key(r["text"]), r["text"]))  # mix the classes
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["text", "label", "name"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        paths[name] = out / f"{name}.csv"
        atomic_write_text(paths[name], buf.getvalue())
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-module", type=int, default=None,
                    help="rows per module (default: the smallest module's count)")
    ap.add_argument("--eval-share", type=float, default=0.2,
                    help="share of each module's rows held out for eval (default 0.2)")
    args = ap.parse_args()
    paths = build(args.out, args.per_module, args.eval_share)
    for path in paths.values():
        n = path.read_text(encoding="utf-8").count("\n") - 1
        print(f"{path}: {n} rows, {len(MODULES)} labels {', '.join(MODULES)}")


if __name__ == "__main__":
    main()
