"""The thin gRPC servicer for mesh.v1.Placement: convert, call the controller, convert back."""

from __future__ import annotations

import grpc

from mesh.errors import InvalidArgument, Unavailable
from mesh.pb.v1 import internal_pb2, internal_pb2_grpc, types_pb2
from mesh.settings import PlacementSettings
from mesh.types import CopyRecord, CopyState
from placement.controller import Controller
from placement.decider import Unassign

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

    async def UnloadModel(  # noqa: N802 - gRPC method name
        self, request: internal_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> internal_pb2.UnloadModelResponse:
        """Deletes every assignment of the model through the decider (fenced by the leader key),
        with an "unloaded" decision; the registration stays. The next EnsureLoaded (a request)
        places it again, and a spec's min_copies brings copies back through reconcile."""
        if not request.model_id:
            raise InvalidArgument("model_id is required")
        ctl = self.controller
        if not ctl.leader.is_leader:
            raise Unavailable("not the placement leader; retry on the current leader")
        instances = sorted(ctl.state.assigned_instances(request.model_id))
        items = [(inst, request.model_id, "unloaded on request (RepositoryModelUnload)") for inst in instances]
        if items and not await ctl.decider.unassign(Unassign(items, action="unloaded")):
            raise Unavailable("placement lost leadership while unloading; retry")
        return internal_pb2.UnloadModelResponse(instance_ids=instances)
