"""A long pull reports its progress (issue 12 item 4): the pod puts the bytes pulled so far into
its LOADING record about once a second, GetModel answers them per copy, and `mesh load` shows
them while it waits (a bar on a terminal, a line per quarter otherwise). A real mesh (etcd, a
router, placement, one pod) pulling over HTTP from a server that sends slowly."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from mesh import demo
from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from tests.integration.conftest import start_mesh

pytestmark = pytest.mark.integration

HOST = "127.0.0.2"  # allow-listed below: the pods refuse loopback addresses otherwise
CHUNK = 256 * 1024


class SlowServer:
    """Serves one file at about `rate` bytes per second."""

    def __init__(self, body: bytes, rate: int) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(0, len(body), CHUNK):
                    self.wfile.write(body[i:i + CHUNK])
                    time.sleep(CHUNK / rate)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}/big.onnx"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_mesh(etcd_endpoint: str, tmp_path) -> Iterator[tuple[LocalMesh, SlowServer, int]]:
    path = demo.save(demo.linear_model(3, weight_bytes=16 << 20), tmp_path / "big.onnx")
    body = path.read_bytes()
    server = SlowServer(body, rate=4 << 20)  # ~4 s for the 16 MiB
    env = {"MESH_ROUTER_ALLOWED_NETWORKS": f"{HOST}/32", "MESH_RUNTIME_ALLOWED_NETWORKS": f"{HOST}/32"}
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=1, capacity="256MiB", env=env)
    try:
        yield mesh, server, len(body)
    finally:
        mesh.stop()
        server.close()


def test_a_long_pull_shows_its_progress(slow_mesh) -> None:
    mesh, server, size = slow_mesh
    mesh.register("big", server.url)
    cli = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli.main", "load", "big", "--router", mesh.router_addresses[0],
         "--token", mesh.token, "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[tuple[int, int]] = []
    with mesh.router_channel() as channel:
        registry = registry_pb2_grpc.ModelRegistryStub(channel)
        end = time.monotonic() + 60
        while cli.poll() is None and time.monotonic() < end:
            m = registry.GetModel(registry_pb2.GetModelRequest(model_id="big"), timeout=10,
                                  metadata=mesh.auth_metadata)
            seen += [(c.pulled_bytes, c.total_bytes) for c in m.copies
                     if c.state == types_pb2.LOADING and c.total_bytes]
            time.sleep(0.2)
    out, err = cli.communicate(timeout=30)
    assert cli.returncode == 0, out + err
    partial = [(p, t) for p, t in seen if 0 < p < t]
    assert partial and all(t == size for _, t in partial), seen
    assert [p for p, _ in partial] == sorted(p for p, _ in partial)  # it only grows
    lines = out.splitlines()
    assert any(line.startswith("big: pulled ") for line in lines), out
    assert lines[-1].startswith("big: loaded in "), out
