"""Server and channel construction with production limits set on purpose (not grpc defaults)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health_pb2_grpc

from mesh.metrics import Metrics
from mesh.rpc.status import InFlightLimit, StatusServer
from mesh.rpc.tls import CLIENT_RECHECK_S, ClientTLS, ServerTLS

log = logging.getLogger(__name__)


# Clients (routers pinging pods to find frozen ones) may send keepalive pings this often, with
# or without calls in flight; pings more frequent than this are strikes, and after
# MAX_PING_STRIKES the server sends GOAWAY too_many_pings (a ping flood is cut off).
# Half of the fastest client interval we use (1 s), for timer jitter.
MIN_CLIENT_PING_INTERVAL_MS = 500
MAX_PING_STRIKES = 2


def server_options(max_message_bytes: int, max_concurrent_streams: int = 100) -> list[tuple[str, int]]:
    """Limits of every server, set on purpose (RELIABILITY.md S12).

    `max_concurrent_streams` is per connection: a client beyond it is queued by its own HTTP/2
    layer, not answered, so a server whose one client multiplexes many callers (a pod behind
    a router) sets it above its own admission limits, letting admission shed with a hint.
    There is no max connection age: it would cut long ModelStreamInfer streams, and routers
    keep one long-lived channel per pod on purpose; idle connections close after 30 min.
    """
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_concurrent_streams", max_concurrent_streams),
        ("grpc.max_metadata_size", 16 * 1024),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        # Without this a server counts every ping on a connection with no call in flight as
        # a strike (its allowed interval is then 2 hours): an idle router->pod channel with
        # keepalive_permit_without_calls got GOAWAY too_many_pings after two pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.max_connection_idle_ms", 30 * 60_000),
        ("grpc.so_reuseport", 0),
    ]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Client channels (router -> pods and placement, placement -> pods).

    Keepalive well below the lease TTL (RELIABILITY.md F5, F14): a ping every second and 2 s
    for its ack, so a frozen or blackholed peer's connection is declared dead, and the calls on
    it fail UNAVAILABLE (retried on another copy), within about 3 s; servers permit pings
    this often (MIN_CLIENT_PING_INTERVAL_MS).
    """
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 1_000),
        ("grpc.keepalive_timeout_ms", 2_000),
        # What actually times a keepalive ping out in grpcio 1.85 (its trace says "Set ping
        # timeout timer of 60000ms" whatever keepalive_timeout_ms is): without it a call on a
        # SIGSTOPped pod waited out its whole deadline; with it, it fails UNAVAILABLE in ~3 s.
        ("grpc.http2.ping_timeout_ms", 2_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.enable_retries", 0),
    ]


def make_server(
    listen: str,
    max_message_bytes: int,
    metrics: Metrics,
    max_concurrent_rpcs: int | None = None,
    *,
    limit_setting: str = "",
    max_concurrent_streams: int = 100,
    tls: ServerTLS | None = None,
    health_port: int = 0,
    health_host: str | None = None,
) -> tuple[StatusServer, int]:
    """A grpc.aio server bound to `listen`; returns it with the bound port (for port 0).

    Every handler registered on it maps MeshErrors to their status and is counted and timed
    (mesh/rpc/status.py), wrapped once at registration: no per-RPC interceptor.

    `max_concurrent_rpcs`: RPCs beyond it are shed at once with RESOURCE_EXHAUSTED, a
    `grpc-retry-pushback-ms` hint and a message naming `limit_setting` (status.InFlightLimit).
    grpc's own limit (which answers "Concurrent RPC limit exceeded!" with no hint) sits
    above it as a backstop, for RPCs arriving faster than the shed path answers them.

    `tls`: the port speaks TLS only (mesh/rpc/tls.py; plaintext clients fail the handshake).
    `health_port`: a second, plaintext server on the listen host answering only grpc.health.v1
    (the same statuses), for Kubernetes grpc probes, which cannot speak TLS; on `health_host`
    (default: the listen host).
    """
    limit = InFlightLimit(max_concurrent_rpcs, limit_setting) if max_concurrent_rpcs else None
    server = grpc.aio.server(
        options=server_options(max_message_bytes, max_concurrent_streams),
        maximum_concurrent_rpcs=limit.backstop if limit else None,
    )
    port = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    if not health_port:
        return StatusServer(server, metrics, limit), port
    health_listen = f"{health_host or listen.rsplit(':', 1)[0]}:{health_port}"
    probes = grpc.aio.server(options=server_options(64 * 1024, 8))
    if probes.add_insecure_port(health_listen) == 0:
        raise OSError(f"cannot listen on {health_listen} (health port)")
    return HealthPortServer(server, metrics, limit, probes), port


class HealthPortServer(StatusServer):
    """A StatusServer whose health service is also served, alone and in plaintext, by a second
    server (`probes`), started and stopped with the main one."""

    def __init__(self, server: grpc.aio.Server, metrics: Metrics, limit: InFlightLimit | None,
                 probes: grpc.aio.Server) -> None:
        super().__init__(server, metrics, limit)
        self.probes = probes
        health_pb2_grpc.add_HealthServicer_to_server(self.health, probes)

    async def start(self) -> None:
        await self.probes.start()
        await super().start()

    async def stop(self, grace: float | None) -> None:
        try:
            await super().stop(grace)
        finally:
            await self.probes.stop(None)


class ChannelPool:
    """One long-lived channel per address, closed when the address goes away.

    With `tls` (internal mTLS) the channels are TLS channels presenting this process's client
    certificate. Every CLIENT_RECHECK_S, get() looks at the certificate files; when they
    changed, each address gets a new channel with the new certificate on its next get(), and
    the old channel is closed once its calls finish (within OLD_CHANNEL_GRACE_S).
    """

    OLD_CHANNEL_GRACE_S = 120.0  # above the default deadline of a call (a cold load included)

    def __init__(self, max_message_bytes: int, tls: ClientTLS | None = None) -> None:
        self._options: list[tuple[str, int | str]] = list(channel_options(max_message_bytes))
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tls = tls
        self._credentials: grpc.ChannelCredentials | None = None
        self._generation = 0
        self._made_in: dict[str, int] = {}  # address -> generation of its channel
        self._retiring: dict[grpc.aio.Channel, asyncio.Task[None]] = {}  # closing once idle
        if tls is not None:
            self._options += tls.options()
            self._signature = tls.signature()
            self._credentials = tls.credentials()
            self._checked = time.monotonic()

    def get(self, address: str) -> grpc.aio.Channel:
        if self._tls is not None:
            self._recheck(address)
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
            self._made_in[address] = self._generation
        return channel

    def _recheck(self, address: str) -> None:
        assert self._tls is not None
        now = time.monotonic()
        if now - self._checked >= CLIENT_RECHECK_S:
            self._checked = now
            signature = self._tls.signature()
            if signature is not None and signature != self._signature:
                try:
                    self._credentials = self._tls.credentials()
                except ValueError as exc:
                    log.warning("internal TLS files changed but cannot be read (%s); keeping the old ones", exc)
                else:
                    self._signature = signature
                    self._generation += 1
                    log.info("internal TLS client certificate changed; new channels use it")
        if address in self._channels and self._made_in.get(address) != self._generation:
            self._retire(self._channels.pop(address))

    def _retire(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(self.OLD_CHANNEL_GRACE_S))
        self._retiring[channel] = task
        task.add_done_callback(lambda _: self._retiring.pop(channel, None))

    async def discard(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    def addresses(self) -> list[str]:
        return list(self._channels)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        retiring, self._retiring = dict(self._retiring), {}
        for channel, task in retiring.items():
            task.cancel()
            await channel.close()  # at once: calls still on an old channel are cancelled


def install_stop_signals(stop: asyncio.Event, drain: asyncio.Event | None = None) -> None:
    """SIGINT/SIGTERM set `stop` so main() can shut down in order, within a bounded grace.

    With `drain` (a process that drains, like Kubernetes' stop asks): SIGTERM sets `drain`
    instead, and SIGINT, or a second signal of either kind, sets `stop` (stop at once).
    Installing again replaces the handlers installed before.
    """
    loop = asyncio.get_running_loop()
    if drain is None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return

    def on_term() -> None:
        if drain.is_set() or stop.is_set():
            log.warning("second signal: stopping at once")
            stop.set()
        else:
            log.info("SIGTERM: draining (a second signal stops at once)")
            drain.set()

    def on_int() -> None:
        log.info("SIGINT: stopping at once")
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
