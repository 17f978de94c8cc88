"""`mesh.v1.ModelRegistry` over gRPC: converts messages, calls router.registry, converts back."""

from __future__ import annotations

import dataclasses

import grpc

from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from mesh.types import CopyState, ModelSpec
from router.registry import ModelState, ModelStatus, Registry

_MODEL_STATE = {
    ModelState.NOT_LOADED: types_pb2.NOT_LOADED,
    ModelState.LOADING: types_pb2.MODEL_LOADING,
    ModelState.LOADED: types_pb2.MODEL_LOADED,
    ModelState.FAILED: types_pb2.MODEL_FAILED,
}
_COPY_STATE = {
    CopyState.LOADING: types_pb2.LOADING,
    CopyState.LOADED: types_pb2.LOADED,
    CopyState.FAILED: types_pb2.FAILED,
    CopyState.UNLOADING: types_pb2.UNLOADING,
}


# Scalar fields ModelSpec (domain) and mesh.v1.ModelSpec (wire) share; labels are a map.
_SPEC_FIELDS = tuple(
    f.name for f in dataclasses.fields(ModelSpec)
    if f.name in types_pb2.ModelSpec.DESCRIPTOR.fields_by_name and f.name != "labels"
)


def spec_from_pb(spec: types_pb2.ModelSpec) -> ModelSpec:
    return ModelSpec(**{name: getattr(spec, name) for name in _SPEC_FIELDS}, labels=dict(spec.labels))


def spec_to_pb(spec: ModelSpec) -> types_pb2.ModelSpec:
    return types_pb2.ModelSpec(**{name: getattr(spec, name) for name in _SPEC_FIELDS}, labels=dict(spec.labels))


def status_to_pb(status: ModelStatus) -> types_pb2.ModelStatus:
    spec, stats = status.spec, status.stats
    out = types_pb2.ModelStatus(
        spec=spec_to_pb(spec),
        state=_MODEL_STATE[status.state],
        copies=[
            types_pb2.CopyStatus(
                instance_id=c.instance_id,
                address=c.address,
                state=_COPY_STATE[c.state],
                size_bytes=max(c.size_bytes, 0),
                error=c.error,
                measure_method=c.measure_method,
            )
            for c in sorted(status.copies, key=lambda c: c.instance_id)
        ],
    )
    if stats is not None:
        out.size_bytes = max(stats.size_bytes, 0)
        out.load_ms = max(stats.load_ms, 0)
        out.measure_method = stats.measure_method
        out.last_error = stats.last_error
        out.last_error_unix_ms = stats.last_error_unix_ms
    if status.decision is not None:
        d = status.decision
        where = f" on {d.instance_id}" if d.instance_id else ""
        out.last_decision = f"{d.action}{where}: {d.reason}"
        out.last_decision_unix_ms = d.unix_ms
    return out


class RegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def RegisterModel(
        self, request: registry_pb2.RegisterModelRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.ModelStatus:
        return status_to_pb(await self.registry.register(spec_from_pb(request.spec), context.time_remaining()))

    async def UnregisterModel(
        self, request: registry_pb2.UnregisterModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.UnregisterModelResponse:
        existed = await self.registry.unregister(request.model_id, context.time_remaining())
        return registry_pb2.UnregisterModelResponse(existed=existed)

    async def GetModel(
        self, request: registry_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.ModelStatus:
        return status_to_pb(self.registry.get(request.model_id))

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        models, token = self.registry.list(
            request.page_size, request.page_token, request.tenant, dict(request.label_selector)
        )
        return registry_pb2.ListModelsResponse(
            models=[status_to_pb(m) for m in models], next_page_token=token
        )
