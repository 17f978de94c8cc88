"""Model archives over http(s) (puller/storage/archive.py, HttpClient.pull_tree): unpacked
into the cache folder, with nothing in the archive trusted (paths, links, sizes, counts)."""

from __future__ import annotations

import http.server
import io
import pathlib
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator

import pytest

from mesh.errors import LoadFailed
from puller.storage import archive
from tests.unit.puller.test_storage import HttpClient

FILES = {"model.onnx": b"graph" * 100, "weights.bin": b"w" * 5000, "sub/extra.bin": b"e" * 10}


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz", links: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as t:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            t.addfile(info)
    return out.getvalue()


def zip_bytes(files: dict[str, bytes], link: str = "") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return out.getvalue()


def unpack(tmp_path: pathlib.Path, data: bytes, max_bytes: int = 10**6) -> tuple[dict[str, bytes], list[int]]:
    packed = tmp_path / "packed"
    packed.write_bytes(data)
    folder = tmp_path / "out"
    folder.mkdir()
    told: list[int] = []
    archive.unpack(str(packed), str(folder), max_bytes, "'m.tgz'", told.append)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return files, told


@pytest.mark.parametrize("make", [
    lambda: tar_bytes(FILES), lambda: tar_bytes(FILES, "w"), lambda: zip_bytes(FILES),
    lambda: tar_bytes({f"./mymodel/{k}": v for k, v in FILES.items()}),  # `tar czf m.tgz ./mymodel`
    lambda: zip_bytes({**{f"mymodel/{k}": v for k, v in FILES.items()}, "__MACOSX/mymodel/._model.onnx": b"x"}),
], ids=["tar.gz", "tar", "zip", "tar.gz-one-folder", "zip-one-folder-macos"])
def test_archives_unpack_to_the_model_folder(tmp_path: pathlib.Path, make) -> None:
    files, told = unpack(tmp_path, make())
    assert files == FILES
    assert told == [sum(len(v) for v in FILES.values())]  # the room asked for, before writing
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "out").rglob("*") if p.is_file())


@pytest.mark.parametrize(("data", "reason"), [
    (tar_bytes({"../evil.onnx": b"x", "model.onnx": b"m"}), "outside its folder"),
    (tar_bytes({"/abs/model.onnx": b"x"}), "outside its folder"),
    (zip_bytes({"a/../../model.onnx": b"x"}), "outside its folder"),
    (tar_bytes({"model.onnx": b"m"}, links={"weights.bin": "/etc/passwd"}), "a link"),
    (zip_bytes({"model.onnx": b"m"}, link="weights.bin"), "a link or special file"),
    (tar_bytes({"weights.bin": b"w"}), "no model.onnx at its top"),
    (tar_bytes({"a/model.onnx": b"m", "b/model.onnx": b"m"}), "no model.onnx at its top"),
    (tar_bytes({"model.onnx": b"m" * 2000}), "unpacks to more than 1000 bytes"),
    (tar_bytes({"/".join("d" * 10) + "/x": b"x", "model.onnx": b"m"}), "more than 8 deep"),
    (b"not an archive at all", "is not a readable .tar, .tar.gz or .zip archive"),
    (tar_bytes({"model.onnx": bytes(range(256)) * 3}, "w")[:700], "is not a readable"),
], ids=["dotdot", "absolute", "zip-dotdot", "tar-symlink", "zip-symlink", "no-model", "two-folders",
        "too-big", "too-deep", "garbage", "truncated"])
def test_archives_are_not_trusted(tmp_path: pathlib.Path, data: bytes, reason: str) -> None:
    with pytest.raises(LoadFailed, match=reason) as exc:
        unpack(tmp_path, data, max_bytes=1000)
    assert str(tmp_path) not in str(exc.value)  # no pod path in a user's reason
    assert not (tmp_path / "out" / "evil.onnx").exists() and not (tmp_path / "evil.onnx").exists()


def test_a_zip_that_inflates_past_its_header_is_refused(tmp_path: pathlib.Path) -> None:
    data = bytearray(zip_bytes({"model.onnx": b"m" * 100}))
    # Rewrite the declared size (local header and central directory) to 10 bytes.
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(sig)
        data[at + offset:at + offset + 4] = (10).to_bytes(4, "little")
    with pytest.raises(LoadFailed):
        unpack(tmp_path, bytes(data))
    assert not (tmp_path / "out" / "model.onnx").exists() or (tmp_path / "out" / "model.onnx").stat().st_size <= 10


def test_many_files_are_refused(tmp_path: pathlib.Path) -> None:
    files = {"model.onnx": b"m", **{f"f{i}": b"" for i in range(archive.MAX_FILES + 1)}}
    with pytest.raises(LoadFailed, match=f"more than {archive.MAX_FILES} files"):
        unpack(tmp_path, tar_bytes(files, "w"))


def test_only_archive_suffixes_are_archives() -> None:
    assert archive.is_archive("https://h/m.tar.gz") and archive.is_archive("http://h/a/M.ZIP?x=1")
    assert archive.is_archive("http://h/m.tgz") and archive.is_archive("http://h/m.tar")
    assert not archive.is_archive("http://h/model.onnx") and not archive.is_archive("http://h/tar.gz/model.onnx")


@pytest.fixture
def packed_server() -> Iterator[str]:
    bodies = {"/m.tgz": tar_bytes(FILES), "/m.zip": zip_bytes(FILES)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = bodies.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("name", ["m.tgz", "m.zip"])
async def test_http_pull_tree_unpacks_and_reserves_room(packed_server: str, tmp_path: pathlib.Path, name: str) -> None:
    reserved: list[int] = []

    async def reserve(size: int) -> None:
        reserved.append(size)

    folder = tmp_path / "entry"
    folder.mkdir()
    await HttpClient(10, 10**6).pull_tree(f"{packed_server}/{name}", str(folder), reserve)
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == FILES
    packed = len(tar_bytes(FILES) if name == "m.tgz" else zip_bytes(FILES))
    assert reserved == [packed, packed + sum(len(v) for v in FILES.values())]  # the archive, then both
