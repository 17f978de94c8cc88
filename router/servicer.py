"""`inference.GRPCInferenceService` as one generic handler: every method takes and returns bytes.

ModelInfer / ModelStreamInfer are forwarded untouched (forward.py). The control methods are
answered from the route table and the registry, encoded by router/v2.py; ModelMetadata comes
from the registry and the last measured ModelStats, so it never triggers a load. The Triton
extensions (ModelConfig, ModelStatistics, Repository*) are router/extensions.py's, shared
with the REST front: parsed and serialised here with the generated mesh.inference classes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mesh import errors, process
from mesh.pb.inference import extensions_pb2 as ext
from mesh.state import MeshState
from router import extensions, modelid, tenancy, v2, versions
from router.extensions import Extensions
from router.forward import Forwarder
from router.registry import unknown_model
from router.table import RouteTable

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "meshserve"
PLATFORM = process.PLATFORM



class InferenceServicer:
    def __init__(self, state: MeshState, table: RouteTable, forwarder: Forwarder, ext_: Extensions) -> None:
        self.state = state
        self.table = table
        self.forwarder = forwarder
        self.extensions = ext_
        self._server_metadata = v2.server_metadata_response(SERVER_NAME, process.version(), extensions.EXTENSIONS)

    async def server_live(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return v2.live_response(True)

    async def server_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return v2.live_response(self.table.synced)

    async def server_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._server_metadata

    def _known(self, request: bytes, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        """(the caller's id, the mesh's internal id) of the model a ModelReady / ModelMetadata
        request names, at the version it asks for (NOT_FOUND for one the model lacks); another
        tenant's model answers exactly as an absent one. A vmodel's
        name (or mm-vmodel-id) answers for its primary target (router/vmodels.py)."""
        metadata = context.invocation_metadata()
        vheader, mheader = modelid.headers(metadata)
        name = vheader or mheader or v2.name_of(request)
        shown, spec, _ = self.forwarder.namespace.resolve(
            tenancy.caller(), name, metadata, vmodel_first=bool(vheader), control=True,
            version=v2.version_of(request))  # "" = the highest (router/versions.py)
        if spec is None:
            raise unknown_model(self.state, shown)
        return shown, spec.model_id

    async def model_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return v2.live_response(bool(self.table.ready(self._known(request, context)[1])))

    async def model_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """From the registry and the last load's tensor metadata; a model never loaded is loaded
        first (as Triton and ModelMesh do), since only onnxruntime knows its tensors."""
        name, internal = self._known(request, context)
        stats = await self.extensions.tensors(name, internal, self.forwarder.budget(context))
        return v2.model_metadata_response(
            name,
            self.forwarder.namespace.versions.versions(versions.split(internal)[0]),
            PLATFORM,
            stats.inputs if stats else (),
            stats.outputs if stats else (),
        )

    def _extension(self, parse: type[Any], method: Callable[[Any, float], Awaitable[Any]]) -> Any:
        """A bytes-in, bytes-out handler around one of router/extensions.py's methods."""

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                message = parse.FromString(request)
            except DecodeError:
                raise errors.InvalidArgument(f"malformed {parse.__name__}") from None
            response = await method(message, self.forwarder.budget(context))
            return bytes(response.SerializeToString())

        return grpc.unary_unary_rpc_method_handler(handle)

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
                "ModelConfig": self._extension(ext.ModelConfigRequest, self.extensions.model_config),
                "ModelStatistics": self._extension(ext.ModelStatisticsRequest, self.extensions.model_statistics),
                "RepositoryIndex": self._extension(ext.RepositoryIndexRequest, self.extensions.repository_index),
                "RepositoryModelLoad": self._extension(
                    ext.RepositoryModelLoadRequest, self.extensions.repository_model_load),
                "RepositoryModelUnload": self._extension(
                    ext.RepositoryModelUnloadRequest, self.extensions.repository_model_unload),
            },
        )
