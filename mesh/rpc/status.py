"""The one table from error kinds to gRPC status codes, and the interceptor applying it."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from mesh.errors import Kind, MeshError
from mesh.metrics import Metrics

log = logging.getLogger(__name__)

CODES: dict[Kind, grpc.StatusCode] = {kind: getattr(grpc.StatusCode, kind.value) for kind in Kind}


def code_of(exc: BaseException) -> grpc.StatusCode:
    return CODES[exc.kind] if isinstance(exc, MeshError) else grpc.StatusCode.INTERNAL


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps MeshError to its status, counts and times every RPC. Handlers stay thin."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))
        return handler

    def _record(self, method: str, code: grpc.StatusCode, start: float) -> None:
        m = self.metrics
        m.requests.labels(m.service, method, code.name).inc()
        m.request_seconds.labels(m.service, method).observe(time.perf_counter() - start)

    def _wrap_unary(self, fn: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                response = await fn(request, context)
            except BaseException as exc:
                await self._fail(exc, context, method, start)
                raise
            self._record(method, context.code() or grpc.StatusCode.OK, start)
            return response

        return wrapped

    def _wrap_stream(self, fn: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                async for item in fn(request, context):
                    yield item
            except BaseException as exc:
                await self._fail(exc, context, method, start)
                raise
            self._record(method, grpc.StatusCode.OK, start)

        return wrapped

    async def _fail(
        self, exc: BaseException, context: grpc.aio.ServicerContext, method: str, start: float
    ) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            self._record(method, context.code() or grpc.StatusCode.UNKNOWN, start)
            return
        if isinstance(exc, MeshError):
            code = code_of(exc)
            self._record(method, code, start)
            await context.abort(code, exc.message)
        if isinstance(exc, Exception):
            log.exception("unhandled error in %s", method)
            self._record(method, grpc.StatusCode.INTERNAL, start)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
