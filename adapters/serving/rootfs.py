"""The adapter root of `adapters serve`: what a load may read, read without a window for a swap.

`inside_root` refuses a path that resolves outside the root, with a message that names the
path as the client gave it. Checking the adapter's files by name would leave a window: a link
inside the root could be swapped to point outside between the check and the moment peft opens
the file. So a load reads a `snapshot` instead: each file is opened first,
the real path of what was opened (the descriptor's, not the name's) is checked against the
root, and its bytes are copied into a folder of the server's own; peft loads that copy, and the
model card the page shows later is read from it. A swap after the open changes nothing read.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from ..adapter import CARD_FILE, CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from .protocol import ApiError, short

# Files that peft or our checks read from an adapter folder: each must resolve inside the root.
READ_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, CARD_FILE, "adapter_model.bin")
_PROC_FD = Path("/proc/self/fd")
_CHUNK = 1 << 20


def inside_root(root: Path, path: str) -> Path:
    """The real path of `path` (relative to root, or absolute) if it lies inside root. The
    files in it are checked as they are opened (`snapshot`). A path the OS refuses (a NUL
    byte, a name or path too long) is a 400.
    """
    try:
        real_root = root.resolve()
        target = (real_root / path).resolve()  # follows every link, collapses ".."
        if not target.is_relative_to(real_root):
            raise ApiError(403, f"path {short(path)} is outside the adapter root", param="path")
    except (OSError, ValueError) as e:  # ENAMETOOLONG, "embedded null byte", ...
        why = getattr(e, "strerror", None) or str(e)
        raise ApiError(400, f"path {short(path)} cannot be used: {why}", param="path") from None
    return target


def _outside(path: str, name: str) -> ApiError:
    return ApiError(403, f"path {short(path)}: {name} links to a file outside the adapter root",
                    param="path")


def _opened_path(fd: int, name: Path) -> Path:
    """Where the open descriptor really points. Linux: /proc says. Elsewhere: the name,
    resolved, and only if it still names the very file that is open (same device and inode),
    so a link swapped between the open and this check is refused rather than believed."""
    if _PROC_FD.is_dir():
        return Path(os.readlink(_PROC_FD / str(fd)))
    real = name.resolve()
    opened, named = os.fstat(fd), os.stat(real)
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
        raise OSError(errno.ESTALE, "the file changed while it was opened")
    return real


def _copy_checked(src: Path, dst: Path, real_root: Path, shown: str) -> None:
    """Copy `src` to `dst` if what opening `src` reached is a regular file inside real_root."""
    # O_NONBLOCK: a FIFO planted under the name must not block the open; reads of a regular
    # file ignore the flag.
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not _opened_path(fd, src).is_relative_to(real_root):
            raise _outside(shown, src.name)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ApiError(400, f"path {short(shown)}: {src.name} is not a regular file",
                           param="path")
        with open(dst, "xb") as out:
            shutil.copyfileobj(f, out, _CHUNK)


def snapshot(root: Path, target: Path, into: Path, shown: str) -> Path:
    """Copy the adapter at `target` (a folder, or an archive file) into the new folder `into`,
    each file checked by what was opened; returns what to load (`into`, or the archive's copy).
    `shown`: the path as the client gave it, for messages."""
    real_root = root.resolve()
    into.mkdir(mode=0o700, exist_ok=True)  # private: mkdtemp's folders are 0700 too
    try:
        if not target.is_dir():
            _copy_checked(target, into / target.name, real_root, shown)
            return into / target.name
        for name in READ_FILES:
            if os.path.lexists(target / name):
                _copy_checked(target / name, into / name, real_root, shown)
    except OSError as e:
        shutil.rmtree(into, ignore_errors=True)
        raise ApiError(400, f"path {short(shown)} cannot be read: {e.strerror}",
                       param="path") from None
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    return into


class Copies:
    """The server's private folder of checked copies, one folder per load. A copy stays while
    its load is under way (`copy_of` .. `done`) or a loaded adapter uses it; `sweep` removes
    the rest. Loads copy on their own threads, so the bookkeeping is under a lock."""

    def __init__(self, root: Path):
        self.root = root
        self._dir = tempfile.TemporaryDirectory(prefix="adapters-serve-")
        self.path = Path(self._dir.name)
        self._pending: set[Path] = set()
        self._lock = threading.Lock()

    def copy_of(self, target: Path, shown: str) -> Path:
        """A checked copy of the adapter at `target` (see `snapshot`), in a folder of its own."""
        with self._lock:  # made and registered at once: a sweep never sees it unregistered
            into = Path(tempfile.mkdtemp(dir=self.path))
            self._pending.add(into)
        try:
            return snapshot(self.root, target, into, shown)
        except BaseException:
            self.discard(into)
            raise

    def _folder(self, copy: Path) -> Path:  # a folder's copy is its folder; an archive's is in one
        return copy if copy.parent == self.path else copy.parent

    def done(self, copy: Path) -> None:
        """The load from `copy` is over; the next sweep removes it unless it is in use."""
        with self._lock:
            self._pending.discard(self._folder(copy))

    def discard(self, copy: Path) -> None:
        """Remove the copy of a load that never ran (nothing was loaded from it)."""
        self.done(copy)
        shutil.rmtree(self._folder(copy), ignore_errors=True)

    def sweep(self, used: Iterable[str | Path]) -> None:
        """Remove every copy that no load under way and no folder in `used` is (or is in)."""
        used = [Path(f) for f in used]
        with self._lock:  # listed and decided together with the registrations
            doomed = [c for c in self.path.iterdir() if c not in self._pending
                      and not any(f == c or f.is_relative_to(c) for f in used)]
        for copy in doomed:
            shutil.rmtree(copy, ignore_errors=True)

    def close(self) -> None:
        self._dir.cleanup()
