"""`mesh.v1.VModels` over gRPC: converts messages, calls router/vmodel_store.py as the RPC's
caller (router/tenancy.py), converts back. Writes need a tenant or admin token
(router/auth.py REGISTRY_WRITES), as registrations do."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from mesh.pb.v1 import vmodels_pb2, vmodels_pb2_grpc
from mesh.rollout import Rollout
from router.rollout_store import RolloutStore
from router.tenancy import caller
from router.vmodel_store import VModelStore, VModelView
from router.vmodels import RolloutWanted, Wanted

SET_METHOD = "/mesh.v1.VModels/SetVModel"
DELETE_METHOD = "/mesh.v1.VModels/DeleteVModel"


def wanted_from_pb(spec: vmodels_pb2.VModelSpec) -> Wanted:
    return Wanted(
        name=spec.name,
        targets=tuple((t.model_id, t.weight) for t in spec.targets),
        sticky_header=spec.sticky_header,
        tags=tuple((t.header, t.value, t.model_id) for t in spec.tags),
    )


def rollout_from_pb(spec: vmodels_pb2.RolloutSpec) -> RolloutWanted:
    return RolloutWanted(
        vmodel=spec.vmodel, candidate=spec.candidate, steps=tuple(spec.steps), dwell_s=spec.dwell_s,
        max_error_rate=spec.max_error_rate, max_p99_ratio=spec.max_p99_ratio, min_requests=spec.min_requests,
        tag_header=spec.tag_header, tag_value=spec.tag_value,
    )


def _figures(raw: Mapping[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in raw.items() if isinstance(v, int | float)}


def rollout_to_pb(name: str, ro: Rollout) -> vmodels_pb2.RolloutStatus:
    return vmodels_pb2.RolloutStatus(
        spec=vmodels_pb2.RolloutSpec(
            vmodel=name, candidate=ro.candidate, steps=ro.steps, dwell_s=ro.dwell_s,
            max_error_rate=ro.max_error_rate, max_p99_ratio=ro.max_p99_ratio, min_requests=ro.min_requests,
            tag_header=ro.tag_header, tag_value=ro.tag_value),
        stable=ro.stable, state=ro.state, step=ro.step, percent=ro.percent,
        step_started_unix_ms=ro.step_started_unix_ms, started_unix_ms=ro.started_unix_ms,
        finished_unix_ms=ro.finished_unix_ms, reason=ro.reason, figures=_figures(ro.figures),
        history=[vmodels_pb2.RolloutStep(
            percent=int(h.get("percent", 0)), started_unix_ms=int(h.get("started_unix_ms", 0)),
            ended_unix_ms=int(h.get("ended_unix_ms", 0)), outcome=str(h.get("outcome", "")),
            figures=_figures(h.get("figures") or {})) for h in ro.history if isinstance(h, Mapping)],
    )


def status_to_pb(view: VModelView) -> vmodels_pb2.VModelStatus:
    asked = view.pending or view.active

    def targets(weights: Mapping[str, int]) -> list[vmodels_pb2.TargetStatus]:
        return [vmodels_pb2.TargetStatus(model_id=m, weight=w, ready_copies=view.ready.get(m, 0))
                for m, w in weights.items()]

    out = vmodels_pb2.VModelStatus(
        spec=vmodels_pb2.VModelSpec(
            name=view.name,
            targets=[vmodels_pb2.VModelTarget(model_id=m, weight=w) for m, w in asked.items()],
            sticky_header=view.sticky_header,
            tags=[vmodels_pb2.TagRoute(header=h, value=v, model_id=m) for h, v, m in view.tags],
        ),
        active=targets(view.active), pending=targets(view.pending),
        switch_note=view.switch_note, updated_unix_ms=view.updated_unix_ms,
        switch_started_unix_ms=view.switch_started_unix_ms,
    )
    if view.rollout is not None:
        out.rollout.CopyFrom(rollout_to_pb(view.name, view.rollout))
    return out


class VModelServicer(vmodels_pb2_grpc.VModelsServicer):
    def __init__(self, store: VModelStore, rollouts: RolloutStore) -> None:
        self.store = store
        self.rollouts = rollouts

    async def SetVModel(self, request: vmodels_pb2.SetVModelRequest,
                        context: grpc.aio.ServicerContext) -> vmodels_pb2.VModelStatus:
        return status_to_pb(await self.store.set(caller(), wanted_from_pb(request.spec), context.time_remaining()))

    async def GetVModel(self, request: vmodels_pb2.GetVModelRequest,
                        context: grpc.aio.ServicerContext) -> vmodels_pb2.VModelStatus:
        return status_to_pb(self.store.get(caller(), request.name))

    async def ListVModels(self, request: vmodels_pb2.ListVModelsRequest,
                          context: grpc.aio.ServicerContext) -> vmodels_pb2.ListVModelsResponse:
        return vmodels_pb2.ListVModelsResponse(vmodels=[status_to_pb(v) for v in self.store.list(caller())])

    async def DeleteVModel(self, request: vmodels_pb2.DeleteVModelRequest,
                           context: grpc.aio.ServicerContext) -> vmodels_pb2.DeleteVModelResponse:
        existed = await self.store.delete(caller(), request.name, context.time_remaining())
        return vmodels_pb2.DeleteVModelResponse(existed=existed)

    async def StartRollout(self, request: vmodels_pb2.StartRolloutRequest,
                           context: grpc.aio.ServicerContext) -> vmodels_pb2.VModelStatus:
        return status_to_pb(await self.rollouts.start(caller(), rollout_from_pb(request.spec),
                                                      context.time_remaining()))

    async def AbortRollout(self, request: vmodels_pb2.AbortRolloutRequest,
                           context: grpc.aio.ServicerContext) -> vmodels_pb2.VModelStatus:
        return status_to_pb(await self.rollouts.abort(caller(), request.vmodel, context.time_remaining()))
