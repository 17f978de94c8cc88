"""file:// artifacts, read only from under the pod's file roots (MESH_RUNTIME_FILE_ROOTS).

Containment is checked on what is opened, not on a path string: the root folder is opened,
then every component below it with openat(O_NOFOLLOW) from the previous folder's fd, so a
symlink anywhere below the root (or a folder or file swapped for one after registration) is
refused by the kernel, with no window between check and open. The opened fd must be a regular,
non-empty file with one hard link (a second link may be a copy of a file outside the roots,
which no path check can see; MESH_RUNTIME_ALLOW_HARD_LINKS accepts them), and the copy reads
that fd, never the path again. /etc/shadow, /proc/self/environ or /dev/zero cannot be under a
root: `/` and system folders are refused as roots (mesh/uripolicy.py).

A URI naming a directory is a multi-file artifact (`pull_tree`): every file below it is opened
the same way (O_NOFOLLOW from its folder's fd, one hard link, a regular file) and copied at its
relative path; dot files are skipped; model.onnx must be at its top.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat

from mesh import uripolicy
from mesh.errors import LoadFailed, PermissionDenied, quote_id
from puller.storage import Auth, DiskFull, Reserve, is_disk_full, open_target

_CHUNK = 1024 * 1024
MAX_FILES = 1000  # files in one multi-file artifact (a model folder)
MAX_DEPTH = 8  # folder levels below it
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO under a root opens at once (then fails the regular-file check) instead of
# blocking a thread forever; O_NOCTTY: a terminal never becomes ours.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def local_path(uri: str) -> str:
    """The absolute, normalised path of a file URI (no `..`); raises InvalidArgument."""
    return uripolicy.file_path(uri)


class FileClient:
    def __init__(self, max_bytes: int, roots: uripolicy.FileRoots | None = None,
                 allow_hard_links: bool = False) -> None:
        self.max_bytes = max_bytes
        self.roots = roots or uripolicy.FileRoots(setting="MESH_RUNTIME_FILE_ROOTS")
        self.allow_hard_links = allow_hard_links

    async def pull(self, uri: str, target: str, reserve: Reserve | None = None, auth: Auth | None = None) -> None:
        path = local_path(uri)
        fd, size = await asyncio.to_thread(self.open, uri, path)
        try:
            if reserve is not None:
                await reserve(size)
            await asyncio.to_thread(self._copy, uri, fd, target, size)
        finally:
            os.close(fd)

    async def pull_tree(self, uri: str, folder: str, reserve: Reserve | None = None,
                        auth: Auth | None = None) -> None:
        """A file as folder/model.onnx, or a directory's files (model.onnx at its top, its
        external data, config.pbtxt, ...) at their relative paths."""
        path = local_path(uri)
        fd, info = await asyncio.to_thread(self._open_any, uri, path)
        if not stat.S_ISDIR(info.st_mode):
            try:
                size = self._check(uri, info)
                if reserve is not None:
                    await reserve(size)
                await asyncio.to_thread(self._copy, uri, fd, os.path.join(folder, "model.onnx"), size)
            finally:
                os.close(fd)
            return
        try:
            files = await asyncio.to_thread(self._walk, uri, fd)
            total = sum(size for _, _, size in files)
            if total > self.max_bytes:
                raise LoadFailed(f"artifact {uripolicy.show(uri)} is {total} bytes in all, over the limit of "
                                 f"{self.max_bytes} (MESH_RUNTIME_MAX_ARTIFACT_BYTES)")
            if reserve is not None:
                await reserve(total)
            await asyncio.to_thread(self._copy_tree, uri, files, folder)
        finally:
            os.close(fd)

    def _open_any(self, uri: str, path: str) -> tuple[int, os.stat_result]:
        """The artifact's file or directory, opened inside its root like `open`."""
        found = self.roots.containing(path)
        if found is None:
            raise self.roots.refuse(uri)
        root, names = found
        if not names:
            raise LoadFailed(f"artifact {uripolicy.show(uri)} is a file root itself; name the model's folder")
        folder = self._root(uri, root)
        try:
            for name in names[:-1]:
                below = self._openat(uri, folder, name, _DIR)
                os.close(folder)
                folder = below
            fd = self._openat(uri, folder, names[-1], _FILE)
        finally:
            os.close(folder)
        return fd, os.fstat(fd)

    def _root(self, uri: str, root: str) -> int:
        try:
            return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise LoadFailed(f"cannot read artifact {uripolicy.show(uri)}: its file root is not readable "
                             "on this pod") from None

    def _walk(self, uri: str, top: int) -> list[tuple[str, int, int]]:
        """(relative path, fd, size) of every file under the directory `top`, each opened
        with O_NOFOLLOW from its folder's fd (a symlink anywhere is refused); the caller's
        `_copy_tree` closes the fds. At most MAX_FILES files, MAX_DEPTH levels."""
        files: list[tuple[str, int, int]] = []
        try:
            self._walk_into(uri, top, "", 0, files)
            if not any(rel == "model.onnx" for rel, _, _ in files):
                raise LoadFailed(f"artifact folder {uripolicy.show(uri)} has no model.onnx at its top")
        except BaseException:
            for _, fd, _ in files:
                os.close(fd)
            raise
        return files

    def _walk_into(self, uri: str, folder: int, prefix: str, depth: int, files: list[tuple[str, int, int]]) -> None:
        if depth > MAX_DEPTH:
            raise LoadFailed(f"artifact folder {uripolicy.show(uri)} nests folders more than {MAX_DEPTH} deep")
        for name in sorted(os.listdir(folder)):
            if name.startswith("."):
                continue  # .git, editors' and tools' droppings: not part of a model
            fd = self._openat(uri, folder, name, _FILE)
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                try:
                    self._walk_into(uri, fd, f"{prefix}{name}/", depth + 1, files)
                finally:
                    os.close(fd)
                continue
            if len(files) >= MAX_FILES:
                os.close(fd)
                raise LoadFailed(f"artifact folder {uripolicy.show(uri)} holds more than {MAX_FILES} files")
            try:
                size = self._check(uri, info, f"{prefix}{name}")
            except BaseException:
                os.close(fd)
                raise
            files.append((f"{prefix}{name}", fd, size))

    def _copy_tree(self, uri: str, files: list[tuple[str, int, int]], folder: str) -> None:
        try:
            for rel, fd, size in files:
                target = os.path.join(folder, rel)
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                self._copy(uri, fd, target, size)
        finally:
            for _, fd, _ in files:
                os.close(fd)

    def open(self, uri: str, path: str) -> tuple[int, int]:
        """(fd, size) of the artifact, opened inside its root; raises PermissionDenied or
        LoadFailed before a byte is read."""
        found = self.roots.containing(path)
        if found is None:
            raise self.roots.refuse(uri)
        root, names = found
        if not names:
            raise LoadFailed(f"artifact {uripolicy.show(uri)} is not a regular file")
        try:
            folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise LoadFailed(f"cannot read artifact {uripolicy.show(uri)}: its file root is not readable "
                             "on this pod") from None
        try:
            for name in names[:-1]:
                below = self._openat(uri, folder, name, _DIR)
                os.close(folder)
                folder = below
            fd = self._openat(uri, folder, names[-1], _FILE)
        finally:
            os.close(folder)
        try:
            size = self._check(uri, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd, size

    def _openat(self, uri: str, folder: int, name: str, flags: int) -> int:
        try:
            return os.open(name, flags, dir_fd=folder)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK) and _is_link(folder, name):
                raise PermissionDenied(
                    f"storage_uri {uripolicy.show(uri)} refused: its path goes through a symbolic "
                    "link; file artifacts are opened only through real folders under the file roots") from None
            if exc.errno == errno.ENOENT:
                raise LoadFailed(f"cannot read artifact {uripolicy.show(uri)}: no such file") from None
            if exc.errno == errno.ENOTDIR:
                raise LoadFailed(f"cannot read artifact {uripolicy.show(uri)}: a folder on its path "
                                 "is a file") from None
            raise LoadFailed(f"cannot read artifact {uripolicy.show(uri)}: {exc.strerror}") from None

    def _check(self, uri: str, info: os.stat_result, member: str = "") -> int:
        shown = uripolicy.show(uri) + (f" (its file {quote_id(member, 80)})" if member else "")
        if not stat.S_ISREG(info.st_mode):
            raise LoadFailed(f"artifact {shown} is not a regular file")
        if info.st_nlink > 1 and not self.allow_hard_links:
            raise PermissionDenied(
                f"storage_uri {shown} refused: the file has {info.st_nlink} hard links (another "
                "link may lie outside the file roots); copy it instead, or the operator sets "
                "MESH_RUNTIME_ALLOW_HARD_LINKS")
        if info.st_size == 0 and not member:
            raise LoadFailed(f"artifact {shown} is empty")
        if info.st_size > self.max_bytes:
            raise LoadFailed(
                f"artifact {shown} is {info.st_size} bytes, over the limit of {self.max_bytes} "
                "(MESH_RUNTIME_MAX_ARTIFACT_BYTES)"
            )
        return info.st_size

    def _copy(self, uri: str, source: int, target: str, size: int) -> None:
        written = 0
        try:
            out = open_target(target)
            try:
                while chunk := os.read(source, _CHUNK):
                    if written + len(chunk) > self.max_bytes:  # it grew since fstat
                        raise LoadFailed(f"artifact {uripolicy.show(uri)} is over the limit of "
                                         f"{self.max_bytes} bytes (MESH_RUNTIME_MAX_ARTIFACT_BYTES)")
                    view = memoryview(chunk)
                    while view:
                        n = os.write(out, view)
                        view = view[n:]
                        written += n
            finally:
                os.close(out)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(written, size) from exc
            raise LoadFailed(f"cannot copy artifact {uripolicy.show(uri)}: {exc.strerror}") from exc


def _is_link(folder: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=folder).st_mode)
    except OSError:
        return False


class FileProvider:
    def __init__(self, max_bytes: int, roots: uripolicy.FileRoots | None = None,
                 allow_hard_links: bool = False) -> None:
        self._client = FileClient(max_bytes, roots, allow_hard_links)

    def client(self, uri: str) -> FileClient:
        return self._client
