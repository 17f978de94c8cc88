"""A bare byte-forwarding grpc.aio proxy (the router-overhead baseline): every method of
inference.GRPCInferenceService is passed through as bytes on one long-lived channel.

    python bench/bare_proxy.py LISTEN_PORT UPSTREAM_HOST:PORT
"""

from __future__ import annotations

import asyncio
import sys

import grpc


def _ident(b: bytes) -> bytes:
    return b


class Proxy(grpc.GenericRpcHandler):
    def __init__(self, upstream: str) -> None:
        self.channel = grpc.aio.insecure_channel(upstream)
        self.calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        call = self.calls.get(method)
        if call is None:
            call = self.calls[method] = self.channel.unary_unary(method)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await call(request, timeout=context.time_remaining())

        return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=_ident, response_serializer=_ident)


async def main(port: int, upstream: str) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Proxy(upstream),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
