"""router/rest_server.py's limits on a loopback port: body cap (413, before the body is read,
also to Expect: 100-continue), header caps, the concurrency cap (503 + Retry-After), and
client disconnects cancelling the request. The front is a stand-in with RestFront's surface."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from mesh.metrics import Metrics
from router.rest import Reply, json_reply
from router.rest_server import RestServer


class Front:
    def __init__(self) -> None:
        self.metrics = Metrics(service="router")
        self.draining = False
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.cancelled = 0
        self.bodies: list[bytes] = []

    async def handle(self, method: str, path: str, query: Any, headers: Any, body: bytes, peer: Any = None) -> Reply:
        self.bodies.append(body)
        if path == "/slow":
            self.entered.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return json_reply({"ok": True, "n": len(body)})


async def _server(front: Front, **kw: Any) -> RestServer:
    server = RestServer(front, "127.0.0.1:0", kw.get("max_body", 1000), kw.get("max_concurrent", 4),
                        kw.get("keepalive_s", 30.0))  # type: ignore[arg-type]
    await server.start()
    return server


async def test_body_cap_and_expect_continue() -> None:
    front = Front()
    server = await _server(front)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as c:
            assert (await c.post("/x", content=b"a" * 1000)).json() == {"ok": True, "n": 1000}
            r = await c.post("/x", content=b"a" * 1001)
            assert r.status_code == 413 and "MESH_ROUTER_MAX_MESSAGE_BYTES" in r.json()["error"]

            async def chunked():  # no Content-Length: cut while reading
                for _ in range(20):
                    yield b"b" * 100

            r = await c.post("/x", content=chunked())
            assert r.status_code == 413
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 100")
        await reader.readline()
        writer.write(b"hello")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        length = 0
        while (line := await reader.readline()).strip():  # the 200's headers
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        assert await reader.readexactly(length) == b'{"ok":true,"n":5}'
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 413"), status  # at once, no 100 Continue first
        writer.close()
    finally:
        await server.stop(1.0)
    assert front.bodies[:2] == [b"a" * 1000, b"hello"]


async def test_header_caps() -> None:
    server = await _server(Front())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as c:
            r = await c.get("/x", headers={f"x-{i}": "v" for i in range(150)})
            assert r.status_code in (400, 431)
            r = await c.get("/x", headers={"x-big": "v" * 20_000})
            assert r.status_code in (400, 431)
            assert (await c.get("/x")).status_code == 200  # still serving
    finally:
        await server.stop(1.0)


async def test_concurrency_cap_sheds_with_503_and_retry_after_and_disconnects_cancel() -> None:
    front = Front()
    server = await _server(front, max_concurrent=1)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as c:
            slow = asyncio.ensure_future(c.get("/slow"))
            await asyncio.wait_for(front.entered.wait(), 10)
            r = await c.get("/x")
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert "MESH_ROUTER_REST_MAX_CONCURRENT" in r.json()["error"]
            front.release.set()
            assert (await slow).status_code == 200
            assert (await c.get("/x")).status_code == 200
        # A client that goes away cancels its request in the front.
        front.release.clear()
        front.entered.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(front.entered.wait(), 10)
        writer.close()
        for _ in range(200):
            if front.cancelled:
                break
            await asyncio.sleep(0.05)
        assert front.cancelled == 1 and server.active == 0
    finally:
        await server.stop(1.0)


async def test_drain_keeps_serving_for_the_settle_then_closes() -> None:
    front = Front()
    server = await _server(front)
    stop = asyncio.Event()
    drain = asyncio.ensure_future(server.drain(0.3, 5.0, stop))
    await asyncio.sleep(0)  # the drain task starts
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as c:
            assert front.draining
            assert (await c.get("/x")).status_code == 200  # within the settle period
        await asyncio.wait_for(drain, 10)
        try:
            await asyncio.open_connection("127.0.0.1", server.port)
            refused = False
        except OSError:
            refused = True
        assert refused
    finally:
        await server.stop(0)
