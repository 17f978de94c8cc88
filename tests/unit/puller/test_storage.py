"""puller.storage: file:// rules and http(s) against a local http.server on a free port; the
size told before writing (`reserve`) and a full disk (/dev/full: every write is ENOSPC)."""

from __future__ import annotations

import http.server
import pathlib
import threading
from collections.abc import Iterator

import pytest

from mesh.errors import InvalidArgument, LoadFailed, PermissionDenied
from mesh.settings import RuntimeSettings
from mesh.uripolicy import Egress, FileRoots
from puller.storage import DiskFull, client_for, providers
from puller.storage.file import FileClient as _FileClient
from puller.storage.http import HttpClient as _HttpClient

# The local test server is on loopback, which the egress policy refuses unless allow-listed.
LOOPBACK = Egress.parse("127.0.0.0/8", "", "MESH_RUNTIME")


def HttpClient(timeout_s: float, max_bytes: int) -> _HttpClient:  # noqa: N802 - stands in for the class
    return _HttpClient(timeout_s, max_bytes, LOOPBACK)


def FileClient(max_bytes: int, root: pathlib.Path | None = None) -> _FileClient:  # noqa: N802
    import tempfile

    return _FileClient(max_bytes, FileRoots.parse(str(root or tempfile.gettempdir()), "MESH_RUNTIME_FILE_ROOTS"))

BODY = b"onnx-bytes" * 1000


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/model.onnx":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/model.onnx")
            self.end_headers()
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def base_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_http_pull_and_redirect(base_url: str, tmp_path: pathlib.Path) -> None:
    client = HttpClient(10, 10**6)
    for path in ("/model.onnx", "/redirect"):
        target = tmp_path / "out"
        await client.pull(base_url + path, str(target))
        assert target.read_bytes() == BODY


async def test_http_errors(base_url: str, tmp_path: pathlib.Path) -> None:
    target = str(tmp_path / "out")
    with pytest.raises(LoadFailed, match="HTTP 404"):
        await HttpClient(10, 10**6).pull(base_url + "/missing", target)
    with pytest.raises(LoadFailed, match="non-http"):
        await HttpClient(10, 10**6).pull(base_url + "/to-file", target)
    with pytest.raises(LoadFailed, match="over the limit"):
        await HttpClient(10, 100).pull(base_url + "/model.onnx", target)


async def test_file_rules(tmp_path: pathlib.Path) -> None:
    client = FileClient(10**6)
    src = tmp_path / "m.onnx"
    src.write_bytes(b"abc")
    await client.pull(src.as_uri(), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == b"abc"
    link = tmp_path / "link.onnx"
    link.symlink_to(src)  # even a symlink that stays inside the root is refused
    with pytest.raises(PermissionDenied, match="symbolic link"):
        await client.pull(link.as_uri(), str(tmp_path / "out2"))
    with pytest.raises(LoadFailed, match="not a regular file"):
        await client.pull(tmp_path.as_uri(), str(tmp_path / "out2"))
    with pytest.raises(LoadFailed, match="no such file"):
        await client.pull((tmp_path / "missing").as_uri(), str(tmp_path / "out2"))
    with pytest.raises(InvalidArgument, match="absolute path"):
        await client.pull("file:relative/x.onnx", str(tmp_path / "out2"))
    with pytest.raises(LoadFailed, match="over the limit"):
        await FileClient(2).pull(src.as_uri(), str(tmp_path / "out2"))


def test_scheme_table() -> None:
    table = providers(RuntimeSettings())
    assert sorted(table) == ["file", "http", "https", "s3"]
    with pytest.raises(InvalidArgument, match="unsupported storage URI scheme 'gs'"):
        client_for(table, "gs://bucket/model.onnx")


FULL = pathlib.Path("/dev/full")  # writes to it fail with ENOSPC, as on a full disk


class Reserved:
    def __init__(self, refuse: bool = False) -> None:
        self.sizes: list[int] = []
        self.refuse = refuse

    async def __call__(self, size: int) -> None:
        self.sizes.append(size)
        if self.refuse:
            raise LoadFailed("no room")


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
async def test_full_disk_is_disk_full_not_a_plain_failure(base_url: str, tmp_path: pathlib.Path) -> None:
    """F19 regression: ENOSPC came back as LoadFailed("cannot copy artifact ...: No space left
    on device"), which the cache could not tell from any other failure, so it never evicted."""
    src = tmp_path / "m.onnx"
    src.write_bytes(b"x" * 5000)
    reserve = Reserved()
    with pytest.raises(DiskFull) as info:
        await FileClient(10**6).pull(src.as_uri(), str(FULL), reserve)
    assert info.value.size == 5000 and reserve.sizes == [5000]
    reserve = Reserved()
    with pytest.raises(DiskFull) as info:
        await HttpClient(10, 10**6).pull(base_url + "/model.onnx", str(FULL), reserve)
    assert info.value.size == len(BODY) and reserve.sizes == [len(BODY)]  # the Content-Length


async def test_reserve_refusal_stops_before_writing(base_url: str, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(b"abc")
    for pull, target in ((FileClient(10**6).pull, tmp_path / "f"), (HttpClient(10, 10**6).pull, tmp_path / "h")):
        uri = src.as_uri() if target.name == "f" else base_url + "/model.onnx"
        with pytest.raises(LoadFailed, match="no room"):
            await pull(uri, str(target), Reserved(refuse=True))
        assert not target.exists()
