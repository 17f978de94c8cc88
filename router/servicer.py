"""`inference.GRPCInferenceService` as one generic handler: every method takes and returns bytes.

ModelInfer / ModelStreamInfer are forwarded untouched (forward.py). The control methods are
answered from the route table and the registry, encoded by router/v2.py; ModelMetadata comes
from the registry and the last measured ModelStats, so it never triggers a load.
"""

from __future__ import annotations

import asyncio

import grpc

from mesh import errors, process
from mesh.state import MeshState
from router import tenancy, v2
from router.forward import Forwarder
from router.registry import unknown_model
from router.table import RouteTable

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "meshserve"
PLATFORM = process.PLATFORM



class InferenceServicer:
    def __init__(self, state: MeshState, table: RouteTable, forwarder: Forwarder) -> None:
        self.state = state
        self.table = table
        self.forwarder = forwarder
        self._server_metadata = v2.server_metadata_response(SERVER_NAME, process.version(), ())

    async def server_live(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return v2.live_response(True)

    async def server_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return v2.live_response(self.table.synced)

    async def server_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._server_metadata

    def _known(self, request: bytes) -> tuple[str, str]:
        """(the caller's id, the mesh's internal id) of the model a ModelReady / ModelMetadata
        request names; another tenant's model answers exactly as an absent one."""
        name = v2.name_of(request)
        spec = self.forwarder.namespace.lookup(tenancy.caller(), name)
        if spec is None:
            raise unknown_model(self.state, name)
        return name, spec.model_id

    async def model_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return v2.live_response(bool(self.table.ready(self._known(request)[1])))

    async def model_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """From the registry and the last load's tensor metadata; a model never loaded is loaded
        first (as Triton and ModelMesh do), since only onnxruntime knows its tensors."""
        name, internal = self._known(request)
        stats = self.state.stats.get(internal)
        if stats is None or not stats.inputs:
            deadline = asyncio.get_running_loop().time() + self.forwarder.budget(context)
            try:
                await self.forwarder.miss.ensure(internal, deadline)
            except errors.MeshError as exc:
                raise self.forwarder.namespace.renamed(exc, internal, name) from None
            try:
                async with asyncio.timeout_at(deadline):
                    await self.state.wait_for(lambda: (s := self.state.stats.get(internal)) and s.inputs, None)
            except TimeoutError:
                raise errors.DeadlineExceeded(f"metadata of model '{name}' not known before the deadline") from None
            stats = self.state.stats.get(internal)
        return v2.model_metadata_response(
            name,
            ["1"],
            PLATFORM,
            stats.inputs if stats else (),
            stats.outputs if stats else (),
        )

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerLive": unary(self.server_live),
                "ServerReady": unary(self.server_ready),
                "ServerMetadata": unary(self.server_metadata),
                "ModelReady": unary(self.model_ready),
                "ModelMetadata": unary(self.model_metadata),
                "ModelInfer": unary(self.forwarder.model_infer),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                    self.forwarder.model_stream_infer
                ),
            },
        )
