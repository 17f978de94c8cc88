"""GetUsage client against a real gRPC server playing a runtime pod, and an unreachable one."""

from __future__ import annotations

import grpc
import pytest

from mesh.pb.v1 import internal_pb2, internal_pb2_grpc
from placement.usage import GrpcUsage, Usage

pytestmark = pytest.mark.integration


class FakeRuntime(internal_pb2_grpc.RuntimeServicer):
    async def GetUsage(self, request, context):  # noqa: N802
        return internal_pb2.GetUsageResponse(
            models=[internal_pb2.ModelUsage(model_id="m1", last_used_unix_ms=123, in_flight=2, requests=9)]
        )


async def test_usage_from_a_pod_and_fallback_when_unreachable() -> None:
    server = grpc.aio.server()
    internal_pb2_grpc.add_RuntimeServicer_to_server(FakeRuntime(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    usage = GrpcUsage(timeout=1.0)
    try:
        assert await usage.get(f"127.0.0.1:{port}") == {"m1": Usage(123, 2)}
        assert await usage.get("127.0.0.1:1") is None
        await usage.forget({f"127.0.0.1:{port}"})
    finally:
        await usage.close()
        await server.stop(None)
