"""The pod's gRPC data plane: KServe V2 inference for its loaded models, and GetUsage.

Thin servicers: convert, call codec / executor, convert back. A model not loaded here is
UNAVAILABLE (the router retries another copy); errors are MeshErrors mapped once by the
the status wrapping of mesh/rpc/status.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from mesh import process
from mesh.clock import Clock
from mesh.errors import MeshError, NotFound, Unavailable
from mesh.metrics import Metrics
from mesh.pb.inference import grpc_predict_v2_pb2 as pb
from mesh.pb.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mesh.pb.v1 import internal_pb2, internal_pb2_grpc
from mesh.rpc.server import make_server
from mesh.rpc.status import StatusServer
from puller import codec
from puller.datatypes import TensorSpec
from puller.executor import Executor
from puller.table import ModelTable

SERVER_NAME = "meshserve-runtime"
PLATFORM = process.PLATFORM



class Inference(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, table: ModelTable, executor: Executor, clock: Clock, ready: asyncio.Event) -> None:
        self.table = table
        self.executor = executor
        self.clock = clock
        self.ready = ready
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
            raise NotFound(f"model '{request.name}' is not loaded on this pod")
        model = served.model
        return pb.ModelMetadataResponse(
            name=model.model_id,
            platform=PLATFORM,
            inputs=[_tensor_metadata(s) for s in model.inputs.values()],
            outputs=[_tensor_metadata(s) for s in model.outputs.values()],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self.infer(request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            try:
                response = await self.infer(request)
            except MeshError as exc:
                yield pb.ModelStreamInferResponse(error_message=exc.message)
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        served = self.table.get(request.model_name)
        if served is None:
            raise Unavailable(f"model {request.model_name} is not loaded on this pod")
        model = served.model
        decoded = codec.decode_inputs(request, model.inputs)
        names = codec.requested_outputs(request, model.outputs)
        served.begin()
        try:
            if served.batcher is not None:
                arrays = await served.batcher.run(decoded.feeds, names)
            else:
                arrays = await self.executor.run(model, decoded.feeds, names)
        finally:
            served.end(self.clock.unix_ms())
        return _response(request, codec.encode_outputs(names, arrays, decoded.raw))


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def _response(request: pb.ModelInferRequest, outputs: list[codec.EncodedOutput]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    for out in outputs:
        tensor = response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        if out.raw is not None:
            response.raw_output_contents.append(out.raw)
        elif out.field is not None and out.values is not None:
            getattr(tensor.contents, out.field).extend(out.values)
    return response


class Usage(internal_pb2_grpc.RuntimeServicer):
    def __init__(self, table: ModelTable) -> None:
        self.table = table

    async def GetUsage(
        self, request: internal_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.GetUsageResponse:
        return internal_pb2.GetUsageResponse(
            models=[
                internal_pb2.ModelUsage(
                    model_id=model_id,
                    last_used_unix_ms=s.last_used_unix_ms,
                    in_flight=s.in_flight,
                    requests=s.requests,
                )
                for model_id, s in self.table.items()
            ]
        )


def build_server(
    listen: str,
    max_message_bytes: int,
    table: ModelTable,
    executor: Executor,
    clock: Clock,
    ready: asyncio.Event,
    metrics: Metrics,
) -> tuple[StatusServer, int]:
    """The pod's gRPC server (not started) and its bound port."""
    server, port = make_server(listen, max_message_bytes, metrics)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(table, executor, clock, ready), server)
    internal_pb2_grpc.add_RuntimeServicer_to_server(Usage(table), server)
    return server, port
