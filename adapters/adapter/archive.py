"""One file to send: `adapters pack` zips an adapter folder; any command opens such a zip.

Unpacking treats the archive as hostile: every entry must be a plain file whose name stays
inside the target folder (no absolute paths, no `..`, no links), only the adapter's own files
are extracted (never a pickle), and the total size may not exceed what the archive's manifest
says the weights weigh, plus a small allowance for the JSON and the card. Sizes are counted
while copying against a running budget, so a zip that lies about its sizes is cut off too.
Files land in a temporary folder that becomes the cache folder (named by the archive's sha256)
only once the weights' sha256 and the whole folder (`check_files`) are verified; on any failure
it is removed, so a refused archive leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ..errors import AdapterFileError
from ..io import atomic_dir, check_out_file, fsync_dir, sha256_file
from ..model import adapters_home
from .files import CARD_FILE, CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, Manifest, check_files
from .schema import loads

log = logging.getLogger(__name__)
MEMBERS = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, CARD_FILE)
SMALL_FILES_LIMIT = 16 << 20  # config + manifest + card: far below this
_CHUNK = 1 << 20


def cache_root() -> Path:
    """Where archives unpack: ADAPTERS_HOME/unpacked."""
    return adapters_home() / "unpacked"


def is_archive(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and zipfile.is_zipfile(p)


def pack(folder: str | Path, out: str | Path) -> Path:
    """Zip the adapter files of `folder` (checked first) into `out`, atomically."""
    folder, out = Path(folder), Path(out)
    check_out_file(out)
    if check_files(folder) is None:
        raise AdapterFileError(f"{folder}: no {MANIFEST_FILE}; an archive needs one (its "
                               "sizes and hash are checked on unpacking): `adapters convert` "
                               "adds it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{out.name}-", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as z:
            for name in MEMBERS:
                if (folder / name).is_file():
                    # safetensors hardly compress; storing them keeps pack and unpack fast
                    kind = zipfile.ZIP_STORED if name == WEIGHTS_FILE else zipfile.ZIP_DEFLATED
                    z.write(folder / name, name, compress_type=kind)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def resolve_adapter(path: str | Path) -> Path:
    """The folder to load: `path` itself, or the checked, unpacked copy of a zip archive."""
    p = Path(path)
    return unpack(p) if is_archive(p) else p


def unpack(archive: str | Path, target: str | Path | None = None) -> Path:
    """Extract the adapter files of `archive` (checked as hostile) into `target` (default: a
    cache folder named by the archive's sha256) and return it."""
    archive = Path(archive)
    target = Path(target) if target else cache_root() / sha256_file(archive)[:32]
    if (target / MANIFEST_FILE).is_file():
        return target  # unpacked before; check_files on load still checks the hash
    try:
        with zipfile.ZipFile(archive) as z:
            members, manifest = _checked_members(archive, z)
            _extract_checked(archive, z, members, manifest, target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise AdapterFileError(f"{archive}: not a readable zip archive ({e}); refused, "
                               "nothing unpacked") from e
    return target


def _extract_checked(archive: Path, z: zipfile.ZipFile, members, manifest: Manifest,
                     target: Path) -> None:
    """Extract into a temporary folder (atomic_dir) that becomes `target` only once every file
    is checked; any failure (budget, CRC, hash, config, header) removes it."""
    try:
        with atomic_dir(target) as tmp:
            budget = [manifest.weights.bytes + SMALL_FILES_LIMIT]
            for info, name in members:
                limit = manifest.weights.bytes if name == WEIGHTS_FILE else info.file_size
                digest = _extract(z, info, tmp / name, limit, budget)
                if name == WEIGHTS_FILE and digest != manifest.weights.sha256:
                    raise AdapterFileError(f"{WEIGHTS_FILE} does not have the sha256 its "
                                           f"{MANIFEST_FILE} states (tampered or corrupted)")
            check_files(tmp)
    except AdapterFileError as e:
        # the reason without the temporary folder's path
        reason = re.sub(r"\S*\.tmp-[^/\s]+/", "", str(e))
        raise AdapterFileError(f"{archive}: refused, nothing unpacked: {reason}") from e


def _member_name(archive: Path, info: zipfile.ZipInfo) -> str:
    """The entry's plain file name, or AdapterFileError when it is a link or escapes."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise AdapterFileError(f"{archive}: entry {info.filename!r} is a symbolic link; "
                               "refused (an adapter archive holds plain files only)")
    raw = info.filename
    if info.flag_bits & 0x1:  # the zip's "encrypted" bit: nothing here to decrypt it with
        raise AdapterFileError(f"{archive}: entry {raw!r} is encrypted; refused (`adapters "
                               "pack` writes plain entries)")
    parts = PurePosixPath(raw.replace("\\", "/")).parts
    if raw.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
        raise AdapterFileError(f"{archive}: entry {raw!r} points outside the folder it "
                               "unpacks into; refused")
    if "\\" in raw:  # a Windows separator: one tool reads a folder, another a file name
        raise AdapterFileError(f"{archive}: entry {raw!r} has a backslash in its name; "
                               "refused (zip names use '/')")
    return parts[-1] if parts else ""


def _checked_members(archive: Path, z: zipfile.ZipFile
                     ) -> tuple[list[tuple[zipfile.ZipInfo, str]], Manifest]:
    members, skipped = [], []
    for info in z.infolist():
        name = _member_name(archive, info)
        if info.is_dir():
            continue
        if name not in MEMBERS:
            skipped.append(info.filename)
            continue
        members.append((info, name))
    if skipped:
        log.warning("%s: not extracted (not adapter files): %s", archive, ", ".join(skipped))
    by_name = {name: info for info, name in members}
    if len(by_name) != len(members):
        raise AdapterFileError(f"{archive}: holds the same adapter file twice")
    if MANIFEST_FILE not in by_name:
        raise AdapterFileError(f"{archive}: no {MANIFEST_FILE} inside; not made by "
                               "`adapters pack`, so its size and hash cannot be checked")
    if by_name[MANIFEST_FILE].file_size > SMALL_FILES_LIMIT:
        raise AdapterFileError(f"{archive}: {MANIFEST_FILE} is implausibly large")
    source = f"{archive}: {MANIFEST_FILE}"
    manifest = Manifest.from_dict(loads(z.read(by_name[MANIFEST_FILE]), source), source)
    if manifest.weights is None:
        raise AdapterFileError(f"{archive}: {MANIFEST_FILE} does not state the weights' size")
    expected = manifest.weights.bytes
    total = sum(info.file_size for info, _ in members)
    weights = by_name.get(WEIGHTS_FILE)
    if total > expected + SMALL_FILES_LIMIT or (weights and weights.file_size != expected):
        raise AdapterFileError(
            f"{archive}: unpacks to {total} bytes but its manifest says the weights are "
            f"{expected} bytes; refused (a zip bomb or a tampered archive)")
    return members, manifest


def _extract(z: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, limit: int,
             budget: list[int]) -> str:
    """Copy one entry, never more than `limit` or its header's size, nor more than is left
    of the running `budget` (decremented); return the sha256 of what was written."""
    written, digest = 0, hashlib.sha256()
    limit = min(limit, info.file_size)
    with z.open(info) as src, open(dest, "wb") as out:
        while block := src.read(min(_CHUNK, limit - written + 1)):
            written += len(block)
            budget[0] -= len(block)
            if written > limit or budget[0] < 0:
                raise AdapterFileError(f"entry {info.filename!r} holds more bytes than its "
                                       "header or the manifest allows")
            digest.update(block)
            out.write(block)
    return digest.hexdigest()
