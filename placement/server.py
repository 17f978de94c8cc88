"""The thin gRPC servicer for mesh.v1.Placement: convert, call the controller, convert back."""

from __future__ import annotations

import grpc

from mesh.errors import InvalidArgument
from mesh.pb.v1 import internal_pb2, internal_pb2_grpc, types_pb2
from mesh.settings import PlacementSettings
from mesh.types import CopyRecord, CopyState
from placement.controller import Controller

_STATES = {
    CopyState.LOADING: types_pb2.LOADING,
    CopyState.LOADED: types_pb2.LOADED,
    CopyState.FAILED: types_pb2.FAILED,
    CopyState.UNLOADING: types_pb2.UNLOADING,
}


def copy_status(copy: CopyRecord) -> types_pb2.CopyStatus:
    return types_pb2.CopyStatus(
        instance_id=copy.instance_id,
        address=copy.address,
        state=_STATES[copy.state],
        size_bytes=max(copy.size_bytes, 0),
        error=copy.error,
        measure_method=copy.measure_method,
    )


class PlacementServicer(internal_pb2_grpc.PlacementServicer):
    def __init__(self, controller: Controller, settings: PlacementSettings) -> None:
        self.controller = controller
        self.settings = settings

    async def EnsureLoaded(  # noqa: N802 - gRPC method name
        self, request: internal_pb2.EnsureLoadedRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.EnsureLoadedResponse:
        if not request.model_id:
            raise InvalidArgument("model_id is required")
        remaining = context.time_remaining()
        timeout = self.settings.load_timeout_s if remaining is None else remaining
        copies = await self.controller.ensure_loaded(
            request.model_id, timeout, frozenset(request.exclude_instances), request.min_revision)
        return internal_pb2.EnsureLoadedResponse(copies=[copy_status(c) for c in copies])
