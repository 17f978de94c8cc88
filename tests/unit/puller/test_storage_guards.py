"""The pod's fetch guards (puller/storage, mesh/uripolicy.py): containment checked on what is
opened, and http(s) that never reaches a non-public address, against local servers that count
requests (0 hits = refused before any byte was read). Issue 10's cases plus more."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import pathlib
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import uripolicy
from mesh.errors import LoadFailed, PermissionDenied
from mesh.uripolicy import Egress, FileRoots, TenantPrefixes
from puller.storage import Auth
from puller.storage.credentials import Credentials
from puller.storage.file import FileClient
from puller.storage.http import HttpClient

BODY = b"model-bytes" * 100


class Counting:
    """An HTTP server on `host` counting every request; `/model.onnx` answers BODY, `/to?u=URL`
    (also under a folder) redirects to URL; `headers` records what each request carried."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.hits = 0
        self.headers: list[dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.hits += 1
                outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                if "/to?u=" in self.path:  # /to?u=URL or /any/folder/to?u=URL
                    self.send_response(302)
                    self.send_header("Location", self.path.split("/to?u=", 1)[1])
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[Counting]:
    s = Counting()
    yield s
    s.close()


@pytest.fixture
def second() -> Iterator[Counting]:
    s = Counting("127.0.0.2")  # another loopback address: a different origin, allow-listable alone
    yield s
    s.close()


def client(networks: str = "", hosts: str = "", credentials: str = "", redirects: int = 3) -> HttpClient:
    return HttpClient(10, 10**6, Egress.parse(networks, hosts, "MESH_RUNTIME"), redirects, Credentials(credentials))


# -- http(s) ------------------------------------------------------------------------------------


def ssrf_forms(port: int) -> list[str]:
    return [f"http://{h}:{port}/model.onnx" for h in (
        "127.0.0.1", "2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.1", "127.0.0.1.",
        "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "[::127.0.0.1]", "[2002:7f00:1::]",
        "localhost", "0.0.0.0", "0",
    )]


async def test_every_loopback_form_refused_before_a_request(server: Counting, tmp_path: pathlib.Path) -> None:
    """Issue 10 regression: http://[::1]/, http://2130706433/ and friends were fetched."""
    for uri in ssrf_forms(server.port):
        with pytest.raises(PermissionDenied, match="refused: its host"):
            await client().pull(uri, str(tmp_path / "out"))
        assert not (tmp_path / "out").exists(), uri
    assert server.hits == 0


async def test_metadata_refused_without_a_packet(tmp_path: pathlib.Path) -> None:
    for uri in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                "http://[64:ff9b::a9fe:a9fe]/", "http://[::ffff:169.254.169.254]/"):
        with pytest.raises(PermissionDenied, match="metadata|link-local"):
            # even with every private network allowed, metadata needs its own address listed
            await client(networks="10.0.0.0/8,192.168.0.0/16", hosts="169.254.169.254").pull(uri, str(tmp_path / "o"))


async def test_allow_listed_network_is_fetched(server: Counting, tmp_path: pathlib.Path) -> None:
    await client(networks="127.0.0.1/32").pull(f"{server.url}/model.onnx", str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == BODY and server.hits == 1
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o600


async def test_allow_listed_host_connects_to_the_checked_address(server: Counting, tmp_path: pathlib.Path) -> None:
    """The connection goes to the address checked, with the name in the Host header."""
    await client(hosts="localhost").pull(f"http://localhost:{server.port}/model.onnx", str(tmp_path / "out"))
    assert server.headers[-1]["host"] == f"localhost:{server.port}"


async def test_redirect_to_a_refused_address_is_rechecked(server: Counting, second: Counting,
                                                        tmp_path: pathlib.Path) -> None:
    """A5: the first hop is allowed (127.0.0.2), its redirect to 127.0.0.1 (or metadata) is not."""
    for target in (f"{server.url}/model.onnx", f"http://2130706433:{server.port}/model.onnx",
                   "http://169.254.169.254/latest/"):
        with pytest.raises(PermissionDenied):
            await client(networks="127.0.0.2/32").pull(f"{second.url}/to?u={target}", str(tmp_path / "out"))
    assert server.hits == 0 and second.hits == 3


async def test_redirect_out_of_the_tenants_prefixes_is_refused_by_the_pod(
        server: Counting, second: Counting, tmp_path: pathlib.Path) -> None:
    """A tenant allowed only under <second>/acme/ is registered there; a redirect from it to
    another host (allowed by the network policy) must not be followed: the pod re-checks the
    tenant's prefixes on every hop, not only the router at registration."""
    prefixes = TenantPrefixes.parse(json.dumps({"acme": [f"{second.url}/acme/"]}), "MESH_RUNTIME_TENANT_STORAGE_PREFIXES")
    pod = HttpClient(10, 10**6, Egress.parse("127.0.0.0/8", "", "MESH_RUNTIME"), 3, Credentials(""), prefixes)
    with pytest.raises(LoadFailed, match="a redirect leaves the storage prefixes"):
        await pod.pull(f"{second.url}/acme/to?u={server.url}/model.onnx", str(tmp_path / "out"), auth=Auth("acme"))
    assert server.hits == 0 and second.hits == 1
    with pytest.raises(LoadFailed, match="its URI leaves"):  # a record written before the setting
        await pod.pull(f"{server.url}/model.onnx", str(tmp_path / "out"), auth=Auth("acme"))
    assert server.hits == 0
    await pod.pull(f"{second.url}/acme/to?u={second.url}/acme/model.onnx", str(tmp_path / "out"), auth=Auth("acme"))
    assert (tmp_path / "out").read_bytes() == BODY


async def test_redirect_count_bounded_and_off(server: Counting, tmp_path: pathlib.Path) -> None:
    hop = f"{server.url}/to?u={server.url}/model.onnx"
    with pytest.raises(LoadFailed, match="redirected more than 0"):
        await client(networks="127.0.0.1/32", redirects=0).pull(hop, str(tmp_path / "out"))
    await client(networks="127.0.0.1/32", redirects=1).pull(hop, str(tmp_path / "out"))


async def test_no_dns_rebinding_between_check_and_connect(monkeypatch: pytest.MonkeyPatch, server: Counting,
                                                          second: Counting, tmp_path: pathlib.Path) -> None:
    """The name is resolved once, to an allowed address; a resolver that answers a refused one
    the next time is never asked again (the connection uses the checked address)."""
    answers = ["127.0.0.2", "127.0.0.1", "127.0.0.1"]
    real = socket.getaddrinfo

    def rebinding(host: str, *args: object, **kw: object) -> list:
        if host == "rebind.test":
            addr = answers.pop(0)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, second.port))]
        return real(host, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    await client(networks="127.0.0.2/32").pull(f"http://rebind.test:{second.port}/model.onnx", str(tmp_path / "o"))
    assert second.hits == 1 and server.hits == 0 and len(answers) == 2
    assert second.headers[-1]["host"] == f"rebind.test:{second.port}"


async def test_open_and_closed_ports_read_the_same(tmp_path: pathlib.Path) -> None:
    """Issue 10 regression: the error text told open from closed ports."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    stop = threading.Event()

    def slam() -> None:  # accepts and hangs up without a byte: an open non-HTTP port
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=slam, daemon=True)
    thread.start()
    messages = []
    try:
        for sock in (listener, closed):
            port = sock.getsockname()[1]
            with pytest.raises(LoadFailed) as err:
                await client(networks="127.0.0.1/32").pull(f"http://127.0.0.1:{port}/m.onnx", str(tmp_path / "o"))
            messages.append(err.value.message.replace(str(port), "PORT"))
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        closed.close()
    assert messages[0] == messages[1] and "no connection or no answer" in messages[0]


async def test_credentials_sent_to_their_origin_only_and_never_echoed(
        server: Counting, second: Counting, tmp_path: pathlib.Path) -> None:
    secrets = tmp_path / "creds"
    (secrets / "team-a").mkdir(parents=True)
    (secrets / "team-a" / "store").write_text("s3cr3t-token\n")
    (secrets / "team-b" / "store").mkdir(parents=True)  # a mounted Secret's folder, for team-b
    (secrets / "team-b" / "store" / "headers.json").write_text('{"X-Api-Key": "other-s3cr3t"}')
    http = client(networks="127.0.0.0/8", credentials=str(secrets))
    await http.pull(f"{second.url}/model.onnx", str(tmp_path / "o"), auth=Auth("team-a", "store"))
    assert second.headers[-1]["authorization"] == "Bearer s3cr3t-token"
    await http.pull(f"{second.url}/model.onnx", str(tmp_path / "o"), auth=Auth("team-b", "store"))
    assert second.headers[-1]["x-api-key"] == "other-s3cr3t"
    # a redirect to another origin gets no credentials
    await http.pull(f"{second.url}/to?u={server.url}/model.onnx", str(tmp_path / "o"), auth=Auth("team-a", "store"))
    assert "authorization" in second.headers[-1] and "authorization" not in server.headers[-1]
    # another tenant's ref name is not reachable, and no error repeats a secret or a path
    for auth in (Auth("team-c", "store"), Auth("team-a", "missing"), Auth("team-a", "../team-b/store")):
        with pytest.raises(LoadFailed) as err:
            await http.pull(f"{second.url}/model.onnx", str(tmp_path / "o"), auth=auth)
        assert "s3cr3t" not in err.value.message and str(secrets) not in err.value.message
    with pytest.raises(LoadFailed, match="MESH_RUNTIME_CREDENTIALS_DIR"):
        await client(networks="127.0.0.0/8").pull(f"{second.url}/model.onnx", str(tmp_path / "o"),
                                                  auth=Auth("team-a", "store"))


# -- IP encodings (hypothesis) ------------------------------------------------------------------

NON_PUBLIC = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
              "100.64.0.0/10", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"]


def encodings(ip: ipaddress.IPv4Address) -> list[str]:
    n, o = int(ip), ip.packed
    return [str(n), hex(n), ".".join(hex(b) for b in o), ".".join(f"0{b:o}" for b in o),
            f"{o[0]}.{int.from_bytes(o[1:], 'big')}", f"{o[0]}.{o[1]}.{int.from_bytes(o[2:], 'big')}",
            f"[::ffff:{ip}]", f"[::ffff:{o[0] << 8 | o[1]:x}:{o[2] << 8 | o[3]:x}]",
            f"[2002:{o[0] << 8 | o[1]:x}:{o[2] << 8 | o[3]:x}::]", f"[64:ff9b::{ip}]", f"{ip}."]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NON_PUBLIC).flatmap(
    lambda net: st.integers(0, ipaddress.ip_network(net).num_addresses - 1).map(
        lambda i: ipaddress.ip_network(net)[i])))
def test_any_encoding_of_a_non_public_address_is_refused(ip: ipaddress.IPv4Address) -> None:
    for form in encodings(ip):
        uri = f"http://{form}/m.onnx"
        parts = uripolicy.parse(uri, {"http"}, "S")
        with pytest.raises(PermissionDenied):
            Egress().check_literal(uri, parts)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address).filter(lambda a: a.is_global and not a.is_multicast))
def test_integer_and_dotted_forms_decode_to_the_same_address(ip: ipaddress.IPv4Address) -> None:
    for form in encodings(ip)[:6]:
        assert uripolicy.host_literal(form) == ip
        assert uripolicy.forbidden_kind(uripolicy.host_literal(form)) is None  # type: ignore[arg-type]


# -- file:// ------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    r = tmp_path / "models"
    (r / "sub").mkdir(parents=True)
    (r / "sub" / "m.onnx").write_bytes(BODY)
    return r


def files(root: pathlib.Path, **kw: object) -> FileClient:
    return FileClient(10**6, FileRoots.parse(str(root), "MESH_RUNTIME_FILE_ROOTS"), **kw)  # type: ignore[arg-type]


async def test_file_inside_root_is_copied_privately(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    old = os.umask(0)  # a loose umask must not make the copy world-readable
    try:
        await files(root).pull((root / "sub" / "m.onnx").as_uri(), str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert (tmp_path / "out").read_bytes() == BODY
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("path", ["/etc/shadow", "/proc/self/environ", "/dev/zero", "/etc/passwd"])
async def test_system_files_refused(path: str, root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Issue 10 regression: /etc/shadow and /proc/self/environ were copied into the cache."""
    for client_ in (files(root), FileClient(10**6)):  # with roots elsewhere, and with none
        with pytest.raises(PermissionDenied):
            await client_.pull(f"file://{path}", str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["/etc/shadow", "/proc/self/environ", "outside"])
async def test_symlink_swap_after_registration_refused(target: str, root: pathlib.Path,
                                                       tmp_path: pathlib.Path) -> None:
    """Issue 10 regression: replacing a registered file by a symlink got the target copied."""
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"secret" * 10)
    registered = root / "sub" / "m.onnx"
    uri = registered.as_uri()  # what was registered (and checked) while it was a plain file
    registered.unlink()
    registered.symlink_to(outside if target == "outside" else target)
    with pytest.raises(PermissionDenied, match="symbolic link"):
        await files(root).pull(uri, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


async def test_folder_swapped_for_a_symlink_refused(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "m.onnx").write_bytes(b"secret")
    os.rename(root / "sub", tmp_path / "old-sub")
    (root / "sub").symlink_to(outside)
    with pytest.raises(PermissionDenied, match="symbolic link"):
        await files(root).pull((root / "sub" / "m.onnx").as_uri(), str(tmp_path / "out"))


async def test_hard_link_to_a_file_outside_refused_unless_allowed(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"secret" * 10)
    os.link(outside, root / "sub" / "linked.onnx")
    uri = (root / "sub" / "linked.onnx").as_uri()
    with pytest.raises(PermissionDenied, match="hard links"):
        await files(root).pull(uri, str(tmp_path / "out"))
    await files(root, allow_hard_links=True).pull(uri, str(tmp_path / "out"))


async def test_fifo_and_empty_files_refused_without_blocking(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    os.mkfifo(root / "sub" / "fifo.onnx")
    with pytest.raises(LoadFailed, match="not a regular file"):
        await files(root).pull((root / "sub" / "fifo.onnx").as_uri(), str(tmp_path / "out"))
    (root / "sub" / "empty.onnx").write_bytes(b"")
    with pytest.raises(LoadFailed, match="empty"):
        await files(root).pull((root / "sub" / "empty.onnx").as_uri(), str(tmp_path / "out"))


async def test_sibling_folder_with_the_root_as_prefix_refused(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    evil = tmp_path / "models-evil"
    evil.mkdir()
    (evil / "m.onnx").write_bytes(b"x")
    with pytest.raises(PermissionDenied, match="must lie under") as err:
        await files(root).pull((evil / "m.onnx").as_uri(), str(tmp_path / "out"))
    assert str(root) + "," not in err.value.message and "MESH_RUNTIME_FILE_ROOTS" in err.value.message


async def test_root_given_through_a_symlink_still_contains(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """An operator's root may itself be a symlink (/models -> /mnt/models): URIs in either form work."""
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    client_ = FileClient(10**6, FileRoots.parse(str(alias), "MESH_RUNTIME_FILE_ROOTS"))
    for uri in ((alias / "sub" / "m.onnx").as_uri(), (root / "sub" / "m.onnx").as_uri()):
        await client_.pull(uri, str(tmp_path / "out"))
        assert (tmp_path / "out").read_bytes() == BODY
