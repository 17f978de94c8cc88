"""mesh/rpc/status.py's StatusServer: every handler registered on a server built by
make_server maps errors to their status and is counted, whether it came in as a generic
handler (the router's bytes handlers) or as registered method handlers (generated
add_*Servicer_to_server functions, as on the pod and placement)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from mesh.errors import InvalidArgument, NotFound, Unavailable
from mesh.metrics import Metrics
from mesh.rpc.server import make_server

SERVICE = "test.Status"


async def _ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok:" + request


async def _not_found(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise NotFound("no such model 'm'")


async def _bug(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ValueError("a bug")


async def _aborts(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
    raise AssertionError("unreachable")


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise Unavailable("copy went away")


async def _stream_in(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for _ in requests:
        raise InvalidArgument("bad message")
    return b""


def _handlers() -> dict[str, grpc.RpcMethodHandler]:
    unary = grpc.unary_unary_rpc_method_handler
    return {
        "Ok": unary(_ok),
        "NotFound": unary(_not_found),
        "Bug": unary(_bug),
        "Aborts": unary(_aborts),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "StreamIn": grpc.stream_unary_rpc_method_handler(_stream_in),
    }


def _count(metrics: Metrics, method: str, code: str) -> float:
    value = metrics.registry.get_sample_value(
        "mesh_requests_total", {"service": "test", "method": method, "code": code}
    )
    return value or 0.0


@pytest.mark.parametrize("registration", ["generic", "registered"])
async def test_errors_map_to_codes_and_every_rpc_is_counted(registration: str) -> None:
    metrics = Metrics(service="test")
    server, port = make_server("127.0.0.1:0", 1 << 20, metrics)
    if registration == "generic":
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, _handlers())])
    else:
        server.add_registered_method_handlers(SERVICE, _handlers())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def code_of(method: str) -> grpc.StatusCode:
                try:
                    await channel.unary_unary(f"/{SERVICE}/{method}")(b"x", timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            for _ in range(3):
                assert await channel.unary_unary(f"/{SERVICE}/Ok")(b"x", timeout=10) == b"ok:x"
            assert await code_of("NotFound") == grpc.StatusCode.NOT_FOUND
            assert await code_of("Bug") == grpc.StatusCode.INTERNAL
            assert await code_of("Aborts") == grpc.StatusCode.PERMISSION_DENIED
            stream = channel.unary_stream(f"/{SERVICE}/Stream")(b"x", timeout=10)
            assert await stream.read() == b"first"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stream.read()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            async def one() -> AsyncIterator[bytes]:
                yield b"m"

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.stream_unary(f"/{SERVICE}/StreamIn")(one(), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(None)
    assert _count(metrics, "Ok", "OK") == 3
    assert _count(metrics, "NotFound", "NOT_FOUND") == 1
    assert _count(metrics, "Bug", "INTERNAL") == 1
    assert _count(metrics, "Aborts", "PERMISSION_DENIED") == 1
    assert _count(metrics, "Stream", "UNAVAILABLE") == 1
    assert _count(metrics, "StreamIn", "INVALID_ARGUMENT") == 1
    assert metrics.registry.get_sample_value(
        "mesh_request_seconds_count", {"service": "test", "method": "Ok"}
    ) == 3
