"""`mesh.v1.ModelRegistry` over gRPC: converts messages, calls router.registry (models) and
router.quota (tenant quotas, admin scope) as the RPC's caller (router/tenancy.py), converts back."""

from __future__ import annotations

import dataclasses

import grpc

from mesh import uripolicy
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from mesh.rpc.status import code_of
from mesh.types import CopyState, ModelSpec, TenantSpec
from router import auth
from router.quota import TenantStore
from router.registry import ModelState, ModelStatus, Registry
from router.tenancy import caller

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
    out = types_pb2.ModelSpec(**{name: getattr(spec, name) for name in _SPEC_FIELDS}, labels=dict(spec.labels))
    out.storage_uri = uripolicy.shown_stored(spec.storage_uri)
    return out


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
                pulled_bytes=max(c.pulled_bytes, 0),
                total_bytes=max(c.total_bytes, 0),
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


_TENANT_FIELDS = tuple(f.name for f in dataclasses.fields(TenantSpec))


def tenant_from_pb(spec: registry_pb2.TenantSpec) -> TenantSpec:
    return TenantSpec(**{name: getattr(spec, name) for name in _TENANT_FIELDS})


def tenant_status_to_pb(status: tuple[TenantSpec, bool, int]) -> registry_pb2.TenantStatus:
    spec, defaults, count = status
    return registry_pb2.TenantStatus(
        spec=registry_pb2.TenantSpec(**{name: getattr(spec, name) for name in _TENANT_FIELDS}),
        defaults=defaults, registered_models=count)


class RegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    def __init__(self, registry: Registry, tenants: TenantStore) -> None:
        self.registry = registry
        self.tenants = tenants

    async def RegisterModel(
        self, request: registry_pb2.RegisterModelRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.ModelStatus:
        return status_to_pb(await self.registry.register(
            caller(), spec_from_pb(request.spec), context.time_remaining()))

    async def RegisterModels(
        self, request: registry_pb2.RegisterModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterModelsResponse:
        results = await self.registry.register_many(
            caller(), [spec_from_pb(m.spec) for m in request.models], request.replace, context.time_remaining())
        return registry_pb2.RegisterModelsResponse(results=[
            registry_pb2.RegisterModelResult(
                model_id=r.model_id, action=r.action,
                code=code_of(r.error).value[0] if r.error is not None else 0,
                message=r.error.message if r.error is not None else "")
            for r in results])

    async def UnregisterModel(
        self, request: registry_pb2.UnregisterModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.UnregisterModelResponse:
        existed = await self.registry.unregister(caller(), request.model_id, context.time_remaining(),
                                                 version=request.version)
        return registry_pb2.UnregisterModelResponse(existed=existed)

    async def GetModel(
        self, request: registry_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.ModelStatus:
        return status_to_pb(self.registry.get(caller(), request.model_id, request.version))

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        models, token = self.registry.list(
            caller(), request.page_size, request.page_token, request.tenant, dict(request.label_selector)
        )
        return registry_pb2.ListModelsResponse(
            models=[status_to_pb(m) for m in models], next_page_token=token
        )

    # -- tenant quotas (admin scope) ------------------------------------------------------------

    async def SetTenant(
        self, request: registry_pb2.SetTenantRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.TenantStatus:
        auth.require_admin("managing tenant quotas")
        spec = await self.tenants.set(tenant_from_pb(request.spec), context.time_remaining())
        return tenant_status_to_pb(self.tenants.get(spec.tenant))

    async def GetTenant(
        self, request: registry_pb2.GetTenantRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.TenantStatus:
        auth.require_admin("managing tenant quotas")
        return tenant_status_to_pb(self.tenants.get(request.tenant))

    async def ListTenants(
        self, request: registry_pb2.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListTenantsResponse:
        auth.require_admin("managing tenant quotas")
        return registry_pb2.ListTenantsResponse(tenants=[tenant_status_to_pb(t) for t in self.tenants.list()])

    async def DeleteTenant(
        self, request: registry_pb2.DeleteTenantRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeleteTenantResponse:
        auth.require_admin("managing tenant quotas")
        existed = await self.tenants.delete(request.tenant, context.time_remaining())
        return registry_pb2.DeleteTenantResponse(existed=existed)
