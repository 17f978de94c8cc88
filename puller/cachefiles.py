"""The files of the pod's artifact cache (puller/cache.py): private folders and files, sizes,
removal, and the digests an artifact is verified by (model.onnx alone, or the tree of a
multi-file artifact)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil

ARTIFACT = "model.onnx"
HASH_CHUNK = 1024 * 1024
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def private_dir(path: pathlib.Path) -> None:
    """`path` (and missing parents) as a folder only the pod's user can enter, umask or not."""
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, _DIR_MODE)


def file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def rounded(size: int, block: int) -> int:
    return -(-size // block) * block


def size_of(path: pathlib.Path) -> int:
    """Bytes of a file, or of every file under a folder (a download in progress)."""
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    except OSError:
        return 0


def fresh_dir(path: pathlib.Path) -> None:
    remove_tree(path)
    path.mkdir(mode=_DIR_MODE)


def remove_tree(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def private_tree(folder: pathlib.Path) -> int:
    """Makes a cached folder private (folders 0700, files 0600; links left alone, never
    followed); returns the size of its files."""
    total = 0
    os.chmod(folder, _DIR_MODE)
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), _DIR_MODE)
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue  # no client writes links; never chmod through one (onnxcheck refuses it)
            os.chmod(path, _FILE_MODE)
            total += os.path.getsize(path)
    return total


def tree_sha256(folder: pathlib.Path) -> str:
    """The digest of a multi-file artifact: sha256 of the lines "<sha256 of file>  <relative
    path>\n", sorted by path (dot files skipped), i.e. what
    `cd DIR && find . -type f ! -name '.*' -printf '%P\n' | LC_ALL=C sort | xargs sha256sum | sha256sum`
    prints for a folder without dot folders."""
    lines = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not path.is_symlink() and not any(p.startswith(".") for p in rel.split("/")):
            lines.append((rel, file_sha256(path)))
    h = hashlib.sha256()
    for rel, digest in sorted(lines, key=lambda x: x[0].encode()):
        h.update(f"{digest}  {rel}\n".encode())
    return h.hexdigest()


def is_multi_file(folder: pathlib.Path) -> bool:
    """True when an artifact folder holds more than model.onnx alone."""
    return any(p.name != ARTIFACT for p in folder.iterdir())


def artifact_sha256(folder: pathlib.Path) -> str:
    """What a spec's sha256 is compared with: model.onnx's own digest for a single file, the
    tree digest (`tree_sha256`) for a folder of several files."""
    return tree_sha256(folder) if is_multi_file(folder) else file_sha256(folder / ARTIFACT)
