"""The pod's gRPC data plane: KServe V2 inference for its loaded models, and mesh.v1.Runtime
(GetUsage; Load, placement's direct assignment, puller/direct.py).

Thin servicers: convert, call codec / executor, convert back. A model not loaded here is
UNAVAILABLE (the router retries another copy); errors are MeshErrors mapped once by the
the status wrapping of mesh/rpc/status.py. Every inference request passes admission control
first (puller/admission.py: bounded queues per model and per pod, shed with a retry hint,
deadlines checked before anything runs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from mesh import process
from mesh.clock import Clock
from mesh.errors import DeadlineExceeded, MeshError, NotFound, Unavailable, quote_id, redact_paths
from mesh.metrics import Metrics, bind_model
from mesh.pb.inference import grpc_predict_v2_pb2 as pb
from mesh.pb.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mesh.pb.v1 import internal_pb2, internal_pb2_grpc, types_pb2
from mesh.rpc.server import make_server
from mesh.rpc.status import InFlightLimit, StatusServer
from mesh.rpc.tls import ServerTLS
from puller import codec
from puller.admission import Admission
from puller.datatypes import TensorSpec
from puller.direct import DirectLoads
from puller.executor import Executor
from puller.stats import Execution, StatsBook, Timing
from puller.table import ModelTable, Served

SERVER_NAME = "meshserve-runtime"
MODEL_VERSION = "1"  # the one version of every model (router/extensions.py VERSION)
PLATFORM = process.PLATFORM



class Inference(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, table: ModelTable, executor: Executor, clock: Clock, ready: asyncio.Event, admission: Admission,
        stats: StatsBook | None = None,
    ) -> None:
        self.table = table
        self.stats = stats or StatsBook()  # Triton's inference statistics (puller/stats.py)
        self.executor = executor
        self.clock = clock
        self.ready = ready
        self.admission = admission
        self.version = process.version()

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready.is_set())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self.table)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        served = self.table.get(request.name)
        if served is None:
            raise NotFound(f"model {quote_id(request.name)} is not loaded on this pod")
        model = served.model
        return pb.ModelMetadataResponse(
            name=model.model_id,
            platform=PLATFORM,
            inputs=[_tensor_metadata(s) for s in model.inputs.values()],
            outputs=[_tensor_metadata(s) for s in model.outputs.values()],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self.infer(request, context.time_remaining())

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            try:
                response = await self.infer(request, context.time_remaining())
            except MeshError as exc:
                yield pb.ModelStreamInferResponse(error_message=redact_paths(exc.message))
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    async def infer(self, request: pb.ModelInferRequest, remaining_s: float | None) -> pb.ModelInferResponse:
        """`remaining_s`: the caller's time left (None: no deadline)."""
        bind_model(request.model_name)  # the modelId label of the request's metrics (opt-in)
        served = self.table.get(request.model_name)
        if served is None:
            raise Unavailable(f"model {quote_id(request.model_name)} is not loaded on this pod")
        if request.model_version not in ("", MODEL_VERSION):  # as Triton: a version it lacks
            raise NotFound(f"Request for unknown model: {quote_id(request.model_name)} version "
                           f"{quote_id(request.model_version, 16)} is not found (every model has version {MODEL_VERSION})")
        # Admission sheds before any decoding or queueing, and frees the slot however it ends.
        return await self.admission.run(served, remaining_s, lambda: self._run(served, request, remaining_s))

    async def _run(self, served: Served, request: pb.ModelInferRequest, remaining_s: float | None) -> pb.ModelInferResponse:
        model = served.model
        arrived = time.perf_counter_ns()
        timing = Timing()
        try:
            decoded = codec.decode_inputs(request, model.inputs)
            names = codec.requested_outputs(request, model.outputs)
            decoded_ns = time.perf_counter_ns()
            if served.batcher is not None:
                deadline = None if remaining_s is None else asyncio.get_running_loop().time() + remaining_s
                arrays = await served.batcher.run(decoded.feeds, names, deadline, timing)
            else:
                # Cancelled while queued in the pool (caller gone, deadline passed): never runs.
                timing.execution = Execution()
                arrays = await self.executor.run(model, decoded.feeds, names, timing.execution)
            response = _response(request, codec.encode_outputs(names, arrays, model.outputs))
        except MeshError:
            self.stats.failed(model.model_id, self.clock.unix_ms(), arrived, time.perf_counter_ns())
            raise
        first = next(iter(decoded.feeds.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim else 1
        self.stats.succeeded(model.model_id, self.clock.unix_ms(), arrived, decoded_ns, time.perf_counter_ns(),
                             timing, served.batcher is not None, rows)
        return response


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def _response(request: pb.ModelInferRequest, outputs: list[codec.EncodedOutput]) -> pb.ModelInferResponse:
    """As Triton answers: the request's model name and id, the version that ran (every model
    has one, "1"), no parameters, every output in raw_output_contents."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=MODEL_VERSION, id=request.id)
    for out in outputs:
        response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        response.raw_output_contents.append(out.raw)
    return response


class Runtime(internal_pb2_grpc.RuntimeServicer):
    """mesh.v1.Runtime. `loads` is set once the agent exists (it needs the server's port);
    until then Load answers UNAVAILABLE and placement waits for the watch as before."""

    def __init__(self, table: ModelTable, loads: DirectLoads | None = None, stats: StatsBook | None = None) -> None:
        self.table = table
        self.loads = loads
        self.stats = stats or StatsBook()

    async def GetInferStats(
        self, request: internal_pb2.GetInferStatsRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.GetInferStatsResponse:
        return internal_pb2.GetInferStatsResponse(models=self.stats.messages(list(request.model_ids)))

    def usage(self) -> list[internal_pb2.ModelUsage]:
        return [
            internal_pb2.ModelUsage(
                model_id=model_id, last_used_unix_ms=s.last_used_unix_ms, in_flight=s.in_flight, requests=s.requests,
            )
            for model_id, s in self.table.items()
        ]

    async def GetUsage(
        self, request: internal_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.GetUsageResponse:
        return internal_pb2.GetUsageResponse(models=self.usage())

    async def Load(self, request: internal_pb2.LoadRequest, context: grpc.aio.ServicerContext) -> internal_pb2.LoadResponse:
        if self.loads is None:
            raise Unavailable("this runtime pod is not registered yet")
        try:
            record = await self.loads.load(request.assignment, list(request.unassigned), context.time_remaining())
        except TimeoutError:
            raise DeadlineExceeded("the copy was not ready before the caller's deadline; it may still be loading") from None
        copy = types_pb2.CopyStatus(
            instance_id=record.instance_id, address=record.address, state=types_pb2.CopyState.Value(record.state.name),
            size_bytes=max(record.size_bytes, 0), error=record.error, measure_method=record.measure_method,
        )
        return internal_pb2.LoadResponse(copy=copy, models=self.usage())



def build_server(
    listen: str,
    max_message_bytes: int,
    table: ModelTable,
    executor: Executor,
    clock: Clock,
    ready: asyncio.Event,
    metrics: Metrics,
    max_queue_per_model: int = 64,
    max_queue_per_pod: int = 256,
    runtime: Runtime | None = None,
    tls: ServerTLS | None = None,
    health_port: int = 0,
) -> tuple[StatusServer, int]:
    """The pod's gRPC server (not started) and its bound port; with `tls` (internal mTLS) it
    only takes callers presenting a certificate of the internal CA.

    Admission control sheds inference requests beyond the queue limits. The server's RPC
    limit sits a little above them (room for control RPCs, streams and requests being shed),
    and its per-connection stream limit at grpc's backstop above that: routers multiplex every
    caller on one channel per pod, and streams beyond it would wait in the router's HTTP/2
    layer, unanswered. Not much higher: streams the event loop has not picked up yet hold
    their request bytes in grpc's buffers, outside every queue limit.
    """
    rpc_limit = max_queue_per_pod + 64
    server, port = make_server(
        listen, max_message_bytes, metrics, rpc_limit, limit_setting="MESH_RUNTIME_MAX_QUEUE_PER_POD",
        max_concurrent_streams=InFlightLimit(rpc_limit).backstop, tls=tls, health_port=health_port,
    )
    admission = Admission(max_queue_per_model, max_queue_per_pod, metrics, clock)
    runtime = runtime or Runtime(table)
    # One statistics book: Inference fills it, Runtime/GetInferStats reads it.
    inference = Inference(table, executor, clock, ready, admission, runtime.stats)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    internal_pb2_grpc.add_RuntimeServicer_to_server(runtime, server)
    return server, port
