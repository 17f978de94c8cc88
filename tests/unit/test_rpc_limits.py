"""mesh.rpc.server limits on a real grpc.aio server over loopback: RPCs beyond the server's
in-flight limit shed with RESOURCE_EXHAUSTED and a retry hint, and client keepalive pings every
second on an idle connection are permitted (no GOAWAY)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mesh.metrics import Metrics
from mesh.rpc.server import make_server
from mesh.rpc.status import PUSHBACK_KEY, InFlightLimit


async def _server(gate: asyncio.Event, started: list[asyncio.Event] | None = None, **kwargs: object):  # noqa: ANN202
    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if started:
            started.pop().set()
        await gate.wait()
        return b"ok"

    server, port = make_server("127.0.0.1:0", 1 << 20, Metrics(service="router"), **kwargs)  # type: ignore[arg-type]
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.S", {"M": grpc.unary_unary_rpc_method_handler(slow)})])
    await server.start()
    return server, port


async def test_rpcs_beyond_the_limit_are_shed_with_a_hint_naming_the_setting() -> None:
    gate, started = asyncio.Event(), [asyncio.Event(), asyncio.Event()]
    server, port = await _server(gate, list(started), max_concurrent_rpcs=2,
                                 limit_setting="MESH_ROUTER_MAX_CONCURRENT_RPCS")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.S/M")
            held = [asyncio.ensure_future(call(b"x", timeout=30)) for _ in range(2)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"x", timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "MESH_ROUTER_MAX_CONCURRENT_RPCS" in (info.value.details() or "")
            pushback = int(dict(info.value.trailing_metadata() or ())[PUSHBACK_KEY])
            assert InFlightLimit.MIN_PUSHBACK_MS <= pushback <= InFlightLimit.MAX_PUSHBACK_MS
            gate.set()
            assert await asyncio.gather(*held) == [b"ok", b"ok"]
            assert await call(b"x", timeout=30) == b"ok"  # slots freed
            assert server.limit.active == 0
    finally:
        await server.stop(None)


def test_grpc_own_limit_is_a_backstop_above_ours() -> None:
    limit = InFlightLimit(1000, "X")
    assert limit.backstop > limit.limit


async def test_idle_keepalive_pings_every_second_are_permitted() -> None:
    """Regression: the server counted every ping on a connection with no call in flight as a
    strike (no keepalive_permit_without_calls, minimum interval 5 s), so a router pinging an
    idle pod every second to detect a frozen one got GOAWAY too_many_pings after two pings."""
    gate = asyncio.Event()
    gate.set()
    server, port = await _server(gate)
    options = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000),
               ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            assert await channel.unary_unary("/t.S/M")(b"x", timeout=30) == b"ok"
            for _ in range(5):  # about five pings, more than MAX_PING_STRIKES
                await asyncio.sleep(1.0)
                # GOAWAY would drop the channel to IDLE (or TRANSIENT_FAILURE)
                assert channel.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await server.stop(None)
