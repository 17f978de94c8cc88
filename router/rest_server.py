"""Serves router/rest.py's RestFront over HTTP/1.1 with aiohttp's low-level server, on the
router's event loop (docs/BENCHMARKS.md "REST front: HTTP stack" says why aiohttp).

Limits (each answered with a clear status, the process stays up):
- body: `max_message_bytes` (the gRPC port's message limit) after decompression; a larger
  Content-Length is refused before its body is read: 413 (also to `Expect: 100-continue`);
- request line and each header at most MAX_FIELD bytes, at most MAX_HEADERS headers
  (aiohttp's parser: 400 / 431);
- requests in progress at most `rest_max_concurrent`; beyond it 503 with Retry-After at once
  (the router is full, not the caller over a quota: 503 is what load balancers retry on
  another replica; tenant quotas and pods' sheds stay 429);
- idle keep-alive connections closed after `rest_keepalive_s`; a client that goes away
  cancels its request (and the forwarded call).
TLS: the router's public certificate (MESH_ROUTER_TLS_*), re-read when its files change;
with client certificates required, a verified certificate identifies the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from typing import Any

from aiohttp import web

from mesh.rpc import tls
from mesh.rpc.status import pushback_ms
from router.rest import Reply, RestFront, error_reply, retry_after

log = logging.getLogger(__name__)

MAX_HEADERS = 100
MAX_FIELD = 16 * 1024
RELOAD_CHECK_S = 5.0  # how often the certificate files are checked for a rotation


def ssl_context(server_tls: tls.ServerTLS) -> ssl.SSLContext:
    """The public port's certificate as an ssl context (client certificates required when
    the gRPC port requires them)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(server_tls.cert, server_tls.key)
    if server_tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(server_tls.client_ca)
    context.set_alpn_protocols(["http/1.1"])
    return context


class RestServer:
    def __init__(self, front: RestFront, listen: str, max_body_bytes: int, max_concurrent: int,
                 keepalive_s: float, server_tls: tls.ServerTLS | None = None) -> None:
        self.front = front
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]") or "127.0.0.1", int(port)
        self.max_body = max_body_bytes
        self.max_concurrent = max_concurrent
        self.keepalive_s = keepalive_s
        self.tls = server_tls
        self.active = 0
        self.mean_s = 0.0  # EWMA of request durations: the Retry-After of a shed
        self._ssl = ssl_context(server_tls) if server_tls else None
        self._stamp = _stamp(server_tls) if server_tls else None
        self._server: web.Server | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._reloader: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listens; returns the port (the one asked for, or the one chosen for port 0)."""
        self._server = web.Server(
            self._handle, handler_cancellation=True, keepalive_timeout=self.keepalive_s,
            max_line_size=MAX_FIELD, max_field_size=MAX_FIELD, max_headers=MAX_HEADERS, access_log=None,
        )
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(self._server, self.host, self.port, ssl=self._ssl,
                                                  backlog=1024, reuse_address=True)
        self.port = self._listener.sockets[0].getsockname()[1]
        if self.tls is not None:
            self._reloader = asyncio.ensure_future(self._reload())
        return self.port

    async def stop_accepting(self) -> None:
        """Stops listening; connections already open go on being served."""
        if self._listener is not None:
            self._listener.close()

    async def stop(self, grace: float | None) -> None:
        """Stops listening, closes idle connections, lets requests in flight finish within
        `grace` seconds (None or 0: cancels them)."""
        await self.stop_accepting()
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        if self._server is not None:
            await self._server.shutdown(grace or 0.0)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 1.0)

    async def drain(self, settle_s: float, grace_s: float, stop: asyncio.Event) -> None:
        """router/main.py's drain: /v2/health/ready answers 503 at once, requests are still
        accepted for `settle_s`, then the port closes and those in flight get `grace_s`;
        `stop` (a second signal) cuts either wait short."""
        self.front.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settle_s)
        await self.stop_accepting()
        if stop.is_set():
            return
        stopping = asyncio.ensure_future(self.stop(grace_s))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([stopping, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not stopping.done():
            stopping.cancel()

    # -- one request ----------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.active >= self.max_concurrent:
            ms = pushback_ms(self.mean_s)
            self.front.metrics.shed.labels(self.front.metrics.service, "rest_limit").inc()
            return _response(error_reply(
                503, f"router busy: {self.active} REST requests in progress, its limit (raise "
                     f"MESH_ROUTER_REST_MAX_CONCURRENT or add replicas); retry after {ms} ms", retry_after(ms)))
        self.active += 1
        started = time.monotonic()
        try:
            body = await self._body(request)
            if isinstance(body, Reply):
                return _response(body)
            peer = None
            if self._ssl is not None and self.tls is not None and self.tls.require_client_cert:
                ssl_object = request.get_extra_info("ssl_object")
                peer = ssl_object.getpeercert() if ssl_object is not None else None
            reply = await self.front.handle(request.method, request.path, request.query, request.headers,
                                            body, peer)
            return _response(reply)
        finally:
            self.active -= 1
            self.mean_s += 0.05 * (time.monotonic() - started - self.mean_s)

    async def _body(self, request: web.BaseRequest) -> bytes | Reply:
        length = request.content_length
        if length is not None and length > self.max_body:
            return self._too_large(length)
        if request.headers.get("expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not request.can_read_body:
            return b""
        chunks, total = [], 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            total += len(chunk)
            if total > self.max_body:
                return self._too_large(total)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, size: int) -> Reply:
        return error_reply(413, f"request body of {size} bytes or more is over the router's limit of "
                                f"{self.max_body} bytes (MESH_ROUTER_MAX_MESSAGE_BYTES)",
                           (("Connection", "close"),))

    async def _reload(self) -> None:
        """Loads rotated certificate files into the context (new handshakes use them)."""
        assert self.tls is not None and self._ssl is not None
        while True:
            await asyncio.sleep(RELOAD_CHECK_S)
            stamp = _stamp(self.tls)
            if stamp == self._stamp:
                continue
            try:
                self._ssl.load_cert_chain(self.tls.cert, self.tls.key)
                if self.tls.require_client_cert:
                    self._ssl.load_verify_locations(self.tls.client_ca)
                self._stamp = stamp
                log.info("REST port: reloaded its TLS certificate")
            except (OSError, ssl.SSLError) as exc:
                log.warning("REST port: rotated TLS files not loaded (%s); keeping the previous ones", exc)


def _stamp(server_tls: tls.ServerTLS) -> tuple[Any, ...]:
    out: list[Any] = []
    for path in server_tls.files():
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def _response(reply: Reply) -> web.Response:
    response = web.Response(status=reply.status, body=reply.body, content_type=reply.content_type)
    for key, value in reply.headers:
        response.headers[key] = value
    return response
