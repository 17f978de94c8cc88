"""Which HTTP stack serves the router's REST front: throughput and server CPU per request of
(a) a minimal server of each stack answering a tiny fixed infer-like JSON body and (b) the REST
front (router/rest.py, the real router in-process: route table, Forwarder, a real pod with a
tiny model) served by that stack, with the same client, in the same run; ratios (b)/(a) per
stack. Stacks: aiohttp's low-level server, a hand-written server on httptools, one on h11, and
uvicorn + starlette (uvicorn.Server on the router's loop). docs/BENCHMARKS.md "REST front".

    python bench/rest_stack.py [--duration 5] [--concurrency 16] [--stacks aiohttp,httptools,h11,uvicorn]

Everything on 127.0.0.1; each run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from mesh.cli import procs  # noqa: E402
from router.rest import Reply  # noqa: E402

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
FIXED = json.dumps({"model_name": "tiny", "model_version": "1", "outputs": [
    {"name": "output", "datatype": "FP32", "shape": [1, 3], "data": [0.5, 1.5, 2.5]}]}).encode()
STACKS = ("aiohttp", "httptools", "h11", "uvicorn")
App = Callable[[str, str, Any, Any, bytes], Awaitable[Reply]]


async def fixed_app(method: str, path: str, query: Any, headers: Any, body: bytes) -> Reply:
    return Reply(200, FIXED)


# -- one server per stack, the interface router/main.py uses (start, stop, drain) -----------------


class _Base:
    def __init__(self, front: Any, listen: str, *_: Any) -> None:
        self.app: App = front.handle if front is not None else fixed_app
        host, _, port = listen.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)

    async def drain(self, settle_s: float, grace_s: float, stop: asyncio.Event) -> None:
        await self.stop(grace_s)


def _head(status: int, content_type: str, length: int, extra: tuple[tuple[str, str], ...]) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-type: {content_type}", f"content-length: {length}",
             *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class AiohttpMinimal(_Base):
    async def start(self) -> int:
        from aiohttp import web

        async def handle(request: web.BaseRequest) -> web.Response:
            await request.read()
            reply = await self.app(request.method, request.path, request.query, request.headers, b"")
            return web.Response(status=reply.status, body=reply.body, content_type=reply.content_type)

        self.server = web.Server(handle, access_log=None)
        self.listener = await asyncio.get_running_loop().create_server(self.server, self.host, self.port)
        return self.port

    async def stop(self, grace: float | None) -> None:
        self.listener.close()
        await self.server.shutdown(1.0)


class HttptoolsServer(_Base):
    """HTTP/1.1 keep-alive on httptools' parser: one request at a time per connection."""

    async def start(self) -> int:
        import httptools

        app = self.app

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport
                self.parser = httptools.HttpRequestParser(self)
                self.url = b""
                self.headers: dict[str, str] = {}
                self.body: list[bytes] = []

            def on_url(self, url: bytes) -> None:
                self.url += url

            def on_header(self, name: bytes, value: bytes) -> None:
                self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

            def on_body(self, body: bytes) -> None:
                self.body.append(body)

            def on_message_complete(self) -> None:
                url, headers, body = self.url, self.headers, b"".join(self.body)
                self.url, self.headers, self.body = b"", {}, []
                method = self.parser.get_method().decode()
                parsed = httptools.parse_url(url)
                asyncio.ensure_future(self.respond(method, parsed.path.decode(), headers, body))

            async def respond(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
                reply = await app(method, path, {}, headers, body)
                self.transport.write(_head(reply.status, reply.content_type, len(reply.body), reply.headers)
                                     + reply.body)

            def data_received(self, data: bytes) -> None:
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserError:
                    self.transport.close()

        self.listener = await asyncio.get_running_loop().create_server(Protocol, self.host, self.port)
        return self.port

    async def stop(self, grace: float | None) -> None:
        self.listener.close()


class H11Server(_Base):
    async def start(self) -> int:
        import h11

        app = self.app

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h11.Connection(h11.SERVER)
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data:
                            break
                        continue
                    if isinstance(event, h11.Request):
                        chunks = []
                        while True:
                            ev = conn.next_event()
                            if ev is h11.NEED_DATA:
                                conn.receive_data(await reader.read(65536))
                            elif isinstance(ev, h11.Data):
                                chunks.append(ev.data)
                            elif isinstance(ev, h11.EndOfMessage):
                                break
                        headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                        reply = await app(event.method.decode(), event.target.decode().split("?")[0], {}, headers,
                                          b"".join(chunks))
                        out = conn.send(h11.Response(status_code=reply.status, headers=[
                            ("content-type", reply.content_type), ("content-length", str(len(reply.body))),
                            *reply.headers]))
                        out += conn.send(h11.Data(data=reply.body)) + conn.send(h11.EndOfMessage())
                        writer.write(out)
                        await writer.drain()
                        if conn.our_state is h11.MUST_CLOSE:
                            break
                        conn.start_next_cycle()
                    elif isinstance(event, h11.ConnectionClosed):
                        break
            except (h11.RemoteProtocolError, ConnectionError):
                pass
            finally:
                writer.close()

        self.listener = await asyncio.start_server(connection, self.host, self.port)
        return self.port

    async def stop(self, grace: float | None) -> None:
        self.listener.close()


class UvicornServer(_Base):
    async def start(self) -> int:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        app = self.app

        async def endpoint(request: Request) -> Response:
            body = await request.body()
            reply = await app(request.method, request.url.path, request.query_params, request.headers, body)
            return Response(reply.body, reply.status, dict(reply.headers), media_type=reply.content_type)

        asgi = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST", "PUT", "DELETE"])])
        self.server = uvicorn.Server(uvicorn.Config(asgi, host=self.host, port=self.port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:  # noqa: ASYNC110 (uvicorn has no started event to wait on)
            await asyncio.sleep(0.02)
        return self.port

    async def stop(self, grace: float | None) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 5)


def _aiohttp_front() -> Any:
    from router.rest_server import RestServer
    return RestServer


SERVERS: dict[str, tuple[Callable[[], Any], Any]] = {  # stack -> (front server class, minimal server class)
    "aiohttp": (_aiohttp_front, AiohttpMinimal),
    "httptools": (lambda: HttptoolsServer, HttptoolsServer),
    "h11": (lambda: H11Server, H11Server),
    "uvicorn": (lambda: UvicornServer, UvicornServer),
}


# -- the server child ---------------------------------------------------------------------------


def serve(stack: str, mode: str, port: int) -> None:
    front_cls, minimal_cls = SERVERS[stack]

    async def minimal() -> None:
        server = minimal_cls(None, f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0)

    async def front() -> None:
        from mesh.metrics import Metrics
        from mesh.settings import CommonSettings, RouterSettings
        from router import main

        main.RestServer = front_cls()  # type: ignore[misc]  # the stack under test serves the same front
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        settings = RouterSettings(listen=f"127.0.0.1:{procs.free_port()}", rest_listen=f"127.0.0.1:{port}",
                                  allow_anonymous=True)
        await main.serve(CommonSettings(), settings, stop, Metrics(service="router"))

    asyncio.run(minimal() if mode == "minimal" else front())


# -- the client ----------------------------------------------------------------------------------


def _client(url: str, concurrency: int, duration: float, queue: mp.Queue) -> None:
    import aiohttp

    async def run() -> tuple[int, int]:
        done = failed = 0
        end = time.monotonic() + duration
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def worker() -> None:
                nonlocal done, failed
                while time.monotonic() < end:
                    async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                        await r.read()
                        if r.status == 200:
                            done += 1
                        else:
                            failed += 1
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, failed

    queue.put(asyncio.run(run()))


def measure(stack: str, mode: str, env: dict[str, str], duration: float, concurrency: int,
            log: pathlib.Path) -> tuple[float, float, int]:
    """(requests/s, server CPU µs per request, failed) of one server child under the client."""
    port = procs.free_port()
    proc = subprocess.Popen([sys.executable, __file__, "serve", stack, mode, str(port)], env={**os.environ, **env},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        procs.wait_port("127.0.0.1", port, 60, proc)
        url = f"http://127.0.0.1:{port}/v2/models/tiny/infer"
        ctx = mp.get_context("spawn")
        queue: mp.Queue = ctx.Queue()
        warm = ctx.Process(target=_client, args=(url, 2, 1.0, queue))
        warm.start()
        queue.get(timeout=120)
        warm.join()
        cpu0, t0 = common.cpu_seconds(proc.pid), time.monotonic()
        client = ctx.Process(target=_client, args=(url, concurrency, duration, queue))
        client.start()
        done, failed = queue.get(timeout=duration + 120)
        client.join()
        wall, cpu = time.monotonic() - t0, common.cpu_seconds(proc.pid) - cpu0
        return done / wall, cpu / max(done, 1) * 1e6, failed
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per server (default 5)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stacks", default=",".join(STACKS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rest-stack-") as tmp:
        folder = pathlib.Path(tmp)
        mesh = common.start_mesh(folder / "mesh")
        try:
            common.register(mesh, "tiny", common.model_file(folder))
            env = {**mesh.common_env(), "MESH_ROUTER_ADMIN_TOKEN_SHA256": "", "MESH_LOG_LEVEL": "WARNING"}
            print(f"client: aiohttp, {args.concurrency} keep-alive connections, {args.duration:.0f} s per server; "
                  "tiny JSON infer body (1x4 FP32)")
            print(f"{'stack':<10} {'minimal rps':>11} {'µs CPU/req':>10} {'front rps':>10} {'µs CPU/req':>10} "
                  f"{'rps ratio':>9} {'CPU ratio':>9}")
            for stack in args.stacks.split(","):
                rows = [measure(stack, mode, env, args.duration, args.concurrency, folder / f"{stack}-{mode}.log")
                        for mode in ("minimal", "front")]
                (r0, c0, f0), (r1, c1, f1) = rows
                fails = f" ({f0 + f1} failed)" if f0 + f1 else ""
                print(f"{stack:<10} {r0:>11.0f} {c0:>10.0f} {r1:>10.0f} {c1:>10.0f} {r1 / r0:>9.2f} "
                      f"{c1 / c0:>9.2f}{fails}", flush=True)
        finally:
            mesh.stop()


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
