"""Regression tests of the bugs the bad-input work and the fuzzing found in the status
mapping (mesh/rpc/status.py), each over a real grpc.aio server built by make_server with
generated (typed) handlers, as the pod, placement and the registry API register them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from mesh.errors import LoadFailed
from mesh.metrics import Metrics
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from mesh.rpc.server import make_server

REGISTRY = "/mesh.v1.ModelRegistry/"
# A valid GetModelRequest's model_id, then a field whose length runs past the end.
CORRUPT = registry_pb2.GetModelRequest(model_id="m").SerializeToString() + b"\x12\x05ab"


class _Registry(registry_pb2_grpc.ModelRegistryServicer):
    async def GetModel(self, request: registry_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> types_pb2.ModelStatus:
        if request.model_id == "leaky":
            raise LoadFailed("onnxruntime: external data outside the allowed directory: "
                             "/tmp/pytest-7/mesh/cache/pod-1/objects/ab/model.onnx")
        if request.model_id == "bug":
            raise ValueError("Traceback (most recent call last): File \"/work/main/router/x.py\"")
        return types_pb2.ModelStatus(spec=types_pb2.ModelSpec(model_id=request.model_id))


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server, port = make_server("127.0.0.1:0", 1 << 20, Metrics(service="test"))
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(_Registry(), server)
    stream = grpc.stream_stream_rpc_method_handler(
        _echo, request_deserializer=registry_pb2.GetModelRequest.FromString,
        response_serializer=lambda m: m.SerializeToString())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Stream", {"Echo": stream})])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


async def _echo(requests: AsyncIterator[registry_pb2.GetModelRequest],
                context: grpc.aio.ServicerContext) -> AsyncIterator[registry_pb2.GetModelRequest]:
    async for request in requests:
        yield request


async def test_corrupt_request_bytes_are_invalid_argument_not_unknown(channel: grpc.aio.Channel) -> None:
    """Bug: bytes the generated deserializer could not parse (a corrupt field after a valid
    one) came back UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: Error
    parsing message" (grpc.aio's own answer to a raising deserializer) instead of
    INVALID_ARGUMENT."""
    call = channel.unary_unary(REGISTRY + "GetModel")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(CORRUPT, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mesh.v1.GetModelRequest" in (info.value.details() or "")
    assert "DecodeError" not in (info.value.details() or "")
    ok = registry_pb2.GetModelRequest(model_id="m").SerializeToString()
    assert types_pb2.ModelStatus.FromString(await call(ok, timeout=5)).spec.model_id == "m"


async def test_corrupt_message_in_a_stream_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    """Bug: the same for a message of a client stream (ModelStreamInfer on the pod): the
    stream ended INTERNAL (a bug's status) instead of INVALID_ARGUMENT."""
    call = channel.stream_stream("/test.Stream/Echo")
    good = registry_pb2.GetModelRequest(model_id="m").SerializeToString()
    stream = call(iter([good, CORRUPT]), timeout=5)
    assert registry_pb2.GetModelRequest.FromString(await stream.read()).model_id == "m"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_error_messages_never_carry_cache_paths(channel: grpc.aio.Channel) -> None:
    """Bug: a load failure's onnxruntime text reached clients with the pod's cache path
    ("allowed directory: .../cache/pod-1/objects/..."); the status mapping redacts every bare
    path, whichever code formatted the message."""
    call = channel.unary_unary(REGISTRY + "GetModel")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(registry_pb2.GetModelRequest(model_id="leaky").SerializeToString(), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    assert "allowed directory: <path>" in details and "/tmp" not in details and "cache" not in details


async def test_unexpected_exception_is_internal_without_its_text(channel: grpc.aio.Channel) -> None:
    """The last-resort guard: a bug's exception is INTERNAL with a generic message, never its
    text (paths, a traceback); the traceback goes to the server's log."""
    call = channel.unary_unary(REGISTRY + "GetModel")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(registry_pb2.GetModelRequest(model_id="bug").SerializeToString(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error in GetModel"
