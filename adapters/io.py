"""Atomic file and folder writes: a crash or kill leaves the old version or the new, never half."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputPathError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# atomic_dir writes this into every folder it makes: a folder holding it (or our adapter
# manifest, or a checkpoint's state) is an earlier output of ours that a new one may replace.
# A model folder (config.json) or an Ollama folder is not enough: a user's own looks the same.
MARKER = ".adapters-output"
OWNED_MARKERS = (MARKER, "manifest.json", "state.json")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "not a folder"


def check_out_folder(target: str | Path, replace: bool = True) -> None:
    """OutputPathError unless `target` is free for a folder written by this package: absent,
    or a real folder (no link) that is empty or holds an earlier output (OWNED_MARKERS).
    `replace=False`: files are written into it, so any real folder will do."""
    target = Path(target)
    try:
        st = target.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{target}: exists and is {_kind(st.st_mode)}, not a folder; "
                              "refused (nothing is replaced that adapters did not write): "
                              "choose a new folder")
    if not replace:
        return
    names = [p.name for p in target.iterdir()]
    if names and not any(m in names for m in OWNED_MARKERS):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise OutputPathError(f"{target}: a folder that holds files adapters did not write "
                              f"({shown}); refused, as writing the output would replace it: "
                              "choose a new or empty folder")


def check_out_file(path: str | Path) -> None:
    """OutputPathError unless `path` is absent or a regular file (or a link to one)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():  # a dangling link: replacing it would be a surprise too
            raise OutputPathError(f"{path}: a broken symbolic link; refused") from None
        return
    if not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"{path}: exists and is {_kind(st.st_mode)}, not a file; "
                              "refused (nothing is replaced that adapters did not write)")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    check_out_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` in one rename.

    `target` must be free for it (check_out_folder): a device, a FIFO, a file or a folder of
    someone else's files is refused before anything is written and never replaced.
    On an exception the temporary folder is removed and `target` is untouched. A kill -9
    leaves a `.tmp-*` sibling that `clean_stale_tmp` removes later.
    """
    target = Path(target)
    check_out_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text("Written by adapters (adapterkit): a later output to this "
                                  "path may replace this folder whole.\n")
        fsync_tree(tmp)
        check_out_folder(target)  # again: the work inside may have taken minutes
        if target.exists():
            trash = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_tmp(folder: Path) -> list[Path]:
    """Remove leftovers of interrupted atomic_dir writes inside `folder`."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
