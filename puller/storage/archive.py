"""Model archives: an http(s) artifact whose path ends in .tar, .tar.gz, .tgz or .zip is a
model folder packed in one file (HTTP has no listing), as KServe's storage initializer reads
it. It is downloaded, then unpacked into the cache entry's folder and removed.

Unpacking trusts nothing in the archive: only regular files and folders (links, devices and
FIFOs are refused), names relative, without `..`, `.` or empty parts, at most MAX_FILES files
and MAX_DEPTH levels, and the sum of the sizes its headers declare within the pod's artifact
limit before the first byte is written (each file is then cut off at its declared size, so a
zip that inflates past its header is refused too). Dot files and macOS's `__MACOSX/` are
skipped. An archive holding one folder with model.onnx in it (`tar czf m.tgz m/`) is unpacked
from inside that folder. The result must hold model.onnx at its top.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
import stat
import tarfile
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable
from typing import IO

from mesh.errors import LoadFailed

SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_FILES = 1000  # as a file:// or s3:// model folder
MAX_DEPTH = 8
ARTIFACT = "model.onnx"
_CHUNK = 1 << 20


def is_archive(uri: str) -> bool:
    path = urllib.parse.urlsplit(uri).path.lower()
    return path.endswith(SUFFIXES)


def unpack(archive: str, folder: str, max_bytes: int, shown: str, room: Callable[[int], None] = lambda n: None) -> int:
    """Unpacks `archive` into `folder` (existing, empty); returns the bytes written. `room(n)`
    is called with the bytes it will write, once they are known and before the first."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                return _write(folder, _zip_members(z, shown), max_bytes, shown, room)
        with tarfile.open(archive, "r:*") as t:
            return _write(folder, _tar_members(t, shown), max_bytes, shown, room)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, ValueError, NotImplementedError):
        raise LoadFailed(f"artifact {shown} is not a readable .tar, .tar.gz or .zip archive") from None


@dataclasses.dataclass(frozen=True)
class _Member:
    name: str
    size: int  # as its header declares
    is_dir: bool
    open: Callable[[], IO[bytes] | None]


def _tar_members(t: tarfile.TarFile, shown: str) -> list[_Member]:
    members: list[_Member] = []
    for m in t:  # headers one by one: a bounded count, not a list of every entry first
        if len(members) >= 2 * MAX_FILES:  # files and their folders
            raise LoadFailed(f"artifact {shown} holds more than {MAX_FILES} files")
        if not (m.isdir() or m.isreg()):
            kind = "a link" if m.issym() or m.islnk() else "a device or FIFO"
            raise LoadFailed(f"artifact {shown} holds {kind} ({_safe(m.name)}): only files and folders are unpacked")
        members.append(_Member(m.name, m.size, m.isdir(), functools.partial(t.extractfile, m)))
    return members


def _zip_members(z: zipfile.ZipFile, shown: str) -> list[_Member]:
    members: list[_Member] = []
    for info in z.infolist():
        if len(members) >= 2 * MAX_FILES:
            raise LoadFailed(f"artifact {shown} holds more than {MAX_FILES} files")
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix file type recorded (a file)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise LoadFailed(f"artifact {shown} holds a link or special file ({_safe(info.filename)}): only "
                             "files and folders are unpacked")
        members.append(_Member(info.filename, info.file_size, info.is_dir(), functools.partial(z.open, info)))
    return members


def _safe(name: str) -> str:
    return repr(name[:80])


def _clean(name: str, shown: str) -> str | None:
    """The member's path below the folder; None to skip it (dot files, __MACOSX)."""
    rel = name.replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    rel = rel.rstrip("/")
    if not rel:
        return None
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or posixpath.normpath(rel) != rel:
        raise LoadFailed(f"artifact {shown} holds a path outside its folder ({_safe(name)})")
    if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return None
    if len(parts) > MAX_DEPTH + 1:
        raise LoadFailed(f"artifact {shown} nests folders more than {MAX_DEPTH} deep")
    return rel


def _write(folder: str, members: list[_Member], max_bytes: int, shown: str, room: Callable[[int], None]) -> int:
    files: dict[str, _Member] = {}
    total = 0
    for m in members:
        rel = _clean(m.name, shown)
        if rel is None or m.is_dir:
            continue
        if rel in files:
            raise LoadFailed(f"artifact {shown} holds {_safe(rel)} twice")
        files[rel] = m
        total += m.size
        if len(files) > MAX_FILES:
            raise LoadFailed(f"artifact {shown} holds more than {MAX_FILES} files")
        if total > max_bytes:
            raise LoadFailed(f"artifact {shown} unpacks to more than {max_bytes} bytes "
                             "(MESH_RUNTIME_MAX_ARTIFACT_BYTES)")
    strip = ""
    if ARTIFACT not in files:
        tops = {rel.split("/", 1)[0] for rel in files}
        if len(tops) != 1 or f"{next(iter(tops))}/{ARTIFACT}" not in files:
            raise LoadFailed(f"artifact {shown} holds no {ARTIFACT} at its top (nor in its one folder)")
        strip = next(iter(tops)) + "/"
    room(sum(m.size for rel, m in files.items() if rel.startswith(strip)))
    written = 0
    for rel, m in files.items():
        path = os.path.join(folder, rel[len(strip):])
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        stream = m.open()
        if stream is None:
            raise LoadFailed(f"artifact {shown}: {_safe(rel)} cannot be read")
        written += _copy(stream, path, m.size, shown)
    return written


def _copy(stream: IO[bytes], path: str, size: int, shown: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    done = 0
    try:
        with stream:
            while chunk := stream.read(min(_CHUNK, size - done + 1)):
                done += len(chunk)
                if done > size:
                    raise LoadFailed(f"artifact {shown} holds a file larger than its header says")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return done
