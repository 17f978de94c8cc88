"""Triton's extension RPCs on the router: model configuration, statistics, model repository.

One implementation for every front: the gRPC servicer (router/servicer.py) and the REST front
call these methods with the parsed request message (mesh.pb.inference.extensions_pb2, the wire
format of Triton's grpc_service.proto) and the caller's remaining time, and get the response
message back; errors are MeshErrors (NotFound, InvalidArgument, ...), mapped once per front.
The caller is the principal the front bound (`tenancy.caller()`): a tenant sees, loads and
unloads only its own models, by its public ids; another tenant's model answers as an absent
one. Not on the hot path, so the generated classes are used (package mesh.inference, which
tritonclient's code does not define: both still share a process).

What the calls mean in a mesh (docs/PROTOCOL.md "gRPC"):
- ModelConfig: the registry's spec (batching, copies) plus the tensors the last load
  recorded; a model never loaded is loaded first, as for ModelMetadata.
- ModelStatistics: every live pod's totals for the model (puller/stats.py), summed; pods are
  asked in parallel, each within STATS_TIMEOUT_S; a pod that does not answer is left out.
- RepositoryIndex: every registered model the caller may see, with its state.
- RepositoryModelLoad: a ready copy somewhere (the miss path: placement picks the pod).
- RepositoryModelUnload: placement deletes every copy's assignment; the registration stays
  and the next request loads the model again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import grpc

from mesh import errors, process
from mesh.errors import InvalidArgument, MeshError, NotFound, Unavailable, quote_id
from mesh.pb.inference import extensions_pb2 as ext
from mesh.pb.inference import model_config_pb2 as mc
from mesh.pb.v1 import internal_pb2, internal_pb2_grpc
from mesh.rpc.server import ChannelPool
from mesh.state import MeshState
from mesh.types import CopyState, ModelSpec, ModelStats
from router import tenancy, versions
from router.forward import Forwarder
from router.registry import ModelState, Registry, unknown_model
from router.table import RouteTable

log = logging.getLogger(__name__)

# What ServerMetadata lists: the Triton extensions this router implements (a front that adds
# one, e.g. binary_tensor_data over HTTP, appends to the list it answers with).
EXTENSIONS: tuple[str, ...] = ("model_configuration", "model_repository", "statistics")
VERSION = "1"  # the one version of every model the mesh serves
PLATFORM = process.PLATFORM
BACKEND = "onnxruntime"
STATS_TIMEOUT_S = 2.0  # longest wait for one pod's statistics
UNLOAD_WAIT_S = 10.0  # longest wait, after the unload is written, for the copies to stop serving
_TRITON_TYPES = {"BYTES": "TYPE_STRING"}
_READY, _UNAVAILABLE, _LOADING, _UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


class Repository(Protocol):
    """A configured model repository (issue 12): registers a model it holds by name."""

    async def register(self, principal: tenancy.Principal, repository_name: str, model_name: str,
                       parameters: dict[str, ext.ModelRepositoryParameter], budget_s: float) -> ModelSpec | None:
        """The registered spec, or None when the repository has no model of that name."""
        ...


def check_version(name: str, version: str) -> None:
    """A model without versions of its own has one, "1"; "" means it too. Others are NOT_FOUND,
    as Triton's "Request for unknown model: 'm' version 2 is not found". (Registered versions
    are resolved by router/versions.py; this is for a vmodel's name.)"""
    if version not in ("", VERSION):
        raise versions.unknown_version(name, version)


def _dtype(datatype: str) -> int:
    return mc.DataType.Value(_TRITON_TYPES.get(datatype, f"TYPE_{datatype}")) if datatype else mc.TYPE_INVALID


def _shape(meta: object) -> list[int]:
    shape = meta.get("shape") if isinstance(meta, dict) else None
    return [int(d) for d in shape] if isinstance(shape, list | tuple) else []


class Extensions:
    """The Triton extensions over the router's state. `pods`: channels to runtime pods (the
    forwarder's pool); `placement`: channels to placement (the miss handler's)."""

    def __init__(self, state: MeshState, table: RouteTable, forwarder: Forwarder, registry: Registry,
                 pods: ChannelPool, placement: ChannelPool, repository: Repository | None = None) -> None:
        self.state = state
        self.table = table
        self.forwarder = forwarder
        self.registry = registry
        self.pods = pods
        self.placement = placement
        self.repository = repository
        self.namespace = forwarder.namespace

    # -- shared helpers ---------------------------------------------------------------------------

    def known(self, name: str) -> ModelSpec:
        """The model `name` means to the caller; NotFound (or Unavailable while the view is not
        connected) for an absent one and for another tenant's, alike."""
        return self.resolve(name)[1]

    def resolve(self, name: str, metadata: Any = None, version: str = "") -> tuple[str, ModelSpec]:
        """(the id the caller knows the concrete model by, its spec): `name` may be a vmodel's,
        answered for its primary target (router/vmodels.py); `version` "" is the highest
        (router/versions.py), one the model lacks NotFound; errors as `known`."""
        shown, spec, _ = self.namespace.resolve(tenancy.caller(), name, metadata, control=True, version=version)
        if spec is None:
            raise unknown_model(self.state, shown)
        return shown, spec

    async def tensors(self, name: str, internal: str, budget_s: float) -> ModelStats | None:
        """The last load's tensor metadata of the model; a model never loaded is loaded first
        (only onnxruntime knows its tensors), within `budget_s`."""
        stats = self.state.stats.get(internal)
        if stats is not None and stats.inputs:
            return stats
        deadline = asyncio.get_running_loop().time() + budget_s
        try:
            await self.forwarder.miss.ensure(internal, deadline)
        except MeshError as exc:
            raise self.namespace.renamed(exc, internal, name) from None
        try:
            async with asyncio.timeout_at(deadline):
                await self.state.wait_for(lambda: (s := self.state.stats.get(internal)) and s.inputs, None)
        except TimeoutError:
            raise errors.DeadlineExceeded(f"metadata of model {quote_id(name)} not known before the deadline") from None
        return self.state.stats.get(internal)

    # -- ModelConfig -----------------------------------------------------------------------------

    async def model_config(self, request: ext.ModelConfigRequest, budget_s: float) -> ext.ModelConfigResponse:
        """Triton's ModelConfig of a registered model: inputs / outputs from the ONNX graph (as
        the last load recorded them; loaded first if never loaded), max_batch_size and
        dynamic_batching from the spec (batch dimension left out of dims when batching, as
        Triton does), one instance group counting the ready copies."""
        spec = self.resolve(request.name, version=request.version)[1]
        stats = await self.tensors(request.name, spec.model_id, budget_s)
        inputs = list(stats.inputs) if stats else []
        outputs = list(stats.outputs) if stats else []
        batching = spec.max_batch_size > 1 and bool(inputs) and all(
            (s := _shape(t)) and s[0] < 0 for t in inputs)
        cut = 1 if batching else 0
        held = sorted(self.namespace.versions.held(versions.split(spec.model_id)[0]))
        config = mc.ModelConfig(
            name=request.name, platform=PLATFORM, backend=BACKEND,
            max_batch_size=spec.max_batch_size if batching else 0,
            # several versions registered: the policy that serves exactly them
            version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=held))
            if len(held) > 1 else mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
            default_model_filename="model.onnx",
        )
        for t in inputs:
            config.input.add(name=str(t.get("name", "")), data_type=_dtype(str(t.get("datatype", ""))),
                             dims=_shape(t)[cut:])
        for t in outputs:
            config.output.add(name=str(t.get("name", "")), data_type=_dtype(str(t.get("datatype", ""))),
                              dims=_shape(t)[cut:])
        if batching:
            config.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
        ready = self.table.ready(spec.model_id)
        gpu = any((inst := self.state.instances.get(c.instance_id)) is not None and inst.device != "cpu"
                  for c in ready)
        config.instance_group.add(name=request.name, count=len(ready),
                                  kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)
        return ext.ModelConfigResponse(config=config)

    # -- ModelStatistics -------------------------------------------------------------------------

    async def model_statistics(self, request: ext.ModelStatisticsRequest,
                               budget_s: float) -> ext.ModelStatisticsResponse:
        """Triton's InferStatistics per model, summed over every live pod's totals (copies
        evicted earlier included, puller/stats.py). A named model that never ran answers zeros;
        no name: every model the caller may see that has statistics."""
        principal = tenancy.caller()
        if request.name:
            spec = self.resolve(request.name, version=request.version)[1]
            wanted: dict[str, str] = {spec.model_id: _versioned(request.name, spec.model_id)}
        else:
            if request.version:
                raise InvalidArgument("a version needs a model name")
            wanted = {}
        per_pod = await self._gather([] if not wanted else list(wanted), min(budget_s, STATS_TIMEOUT_S))
        summed: dict[str, ext.ModelStatistics] = {}
        for models in per_pod:
            for one in models:
                spec_of = self.state.models.get(one.name)
                if spec_of is None or not self.namespace.visible(principal, spec_of):
                    continue
                if wanted and one.name not in wanted:
                    continue
                _add(summed.setdefault(one.name, _empty(self.namespace.shown_id(principal, spec_of))), one)
        for internal, shown in wanted.items():
            summed.setdefault(internal, _empty(shown))
        ordered = sorted(summed.values(), key=lambda s: s.name)
        for s in ordered:
            s.batch_stats.sort(key=lambda b: b.batch_size)
        return ext.ModelStatisticsResponse(model_stats=ordered)

    async def _gather(self, model_ids: Sequence[str], timeout_s: float) -> list[Sequence[ext.ModelStatistics]]:
        """Every live pod's statistics of `model_ids` (all when empty), asked in parallel."""
        request = internal_pb2.GetInferStatsRequest(model_ids=model_ids)

        async def one(address: str) -> Sequence[ext.ModelStatistics]:
            stub = internal_pb2_grpc.RuntimeStub(self.pods.get(address))
            try:
                return (await stub.GetInferStats(request, timeout=max(timeout_s, 0.01))).models
            except grpc.aio.AioRpcError as exc:
                log.info("statistics of pod %s left out: %s %s", address, exc.code().name, exc.details())
                return ()

        addresses = sorted({inst.address for inst in self.state.instances.values() if inst.address})
        return list(await asyncio.gather(*(one(a) for a in addresses)))

    # -- model repository ------------------------------------------------------------------------

    async def repository_index(self, request: ext.RepositoryIndexRequest,
                               budget_s: float) -> ext.RepositoryIndexResponse:
        """Every registered model the caller may see, by the id it knows it by, with Triton's
        state: READY (a copy serves), LOADING, UNLOADING, or UNAVAILABLE with the reason (the
        last load error, or "not loaded; the next request loads it"). `ready`: READY only."""
        principal = tenancy.caller()
        self._check_repository(request.repository_name)
        response = ext.RepositoryIndexResponse()
        rows = []
        for spec in self.state.models.values():
            if not self.namespace.visible(principal, spec):
                continue
            status = self.registry.status_of(spec)
            state, reason = _triton_state(status.state, status, self.namespace.scrub(principal, _error_of(status)))
            if request.ready and state != _READY:
                continue
            name, version = versions.split(self.namespace.shown_id(principal, spec))
            rows.append((name, int(version), state, reason))
        for name, number, state, reason in sorted(rows):
            response.models.add(name=name, version=str(number), state=state, reason=reason)
        return response

    async def repository_model_load(self, request: ext.RepositoryModelLoadRequest,
                                    budget_s: float) -> ext.RepositoryModelLoadResponse:
        """Returns once a copy of the model is ready on some pod (placement chooses it; an
        already ready one answers at once). An unregistered name is registered from the
        configured model repository when there is one, else NOT_FOUND."""
        principal = tenancy.caller()
        name = request.model_name
        if not name:
            raise InvalidArgument("model_name is required")
        spec = self.namespace.lookup_version(principal, name, "")  # the highest version
        if spec is None and self.repository is not None:
            spec = await self.repository.register(principal, request.repository_name, name,
                                                  dict(request.parameters), budget_s)
        if spec is None:
            if not self.state.view.connected:
                raise unknown_model(self.state, name)
            raise NotFound(f"failed to load {quote_id(name)}: no model of that name is registered "
                           "(register it first; this router has no model repository configured)")
        if self.repository is None:
            self._check_repository(request.repository_name)
            if request.parameters:
                raise InvalidArgument("load parameters (config, file:...) need a model repository; "
                                      f"this router has none (got {sorted(request.parameters)[:4]})")
        deadline = asyncio.get_running_loop().time() + budget_s
        try:
            await self.forwarder.miss.ensure(spec.model_id, deadline)
        except MeshError as exc:
            raise self.namespace.renamed(exc, spec.model_id, name) from None
        # Placement may answer before this router's watch shows the copy: ModelReady right
        # after a load must say true (Triton's load returns once the model is ready).
        try:
            async with asyncio.timeout_at(deadline):
                await self.state.wait_for(lambda: bool(self.table.ready(spec.model_id)), None)
        except TimeoutError:
            raise errors.DeadlineExceeded(f"model {quote_id(name)} loaded but not yet routable here "
                                          "before the deadline; retry") from None
        return ext.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: ext.RepositoryModelUnloadRequest,
                                      budget_s: float) -> ext.RepositoryModelUnloadResponse:
        """Unloads every copy of the model (placement deletes their assignments through its
        leader) and returns once none of them serves, or after UNLOAD_WAIT_S; the registration
        stays, and the next request loads the model again. Unknown model: succeeds (nothing to
        unload), and so does another tenant's, alike."""
        name = request.model_name
        if not name:
            raise InvalidArgument("model_name is required")
        self._check_repository(request.repository_name)
        spec = self.namespace.lookup_version(tenancy.caller(), name, "")
        if spec is None:
            return ext.RepositoryModelUnloadResponse()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        every = sorted(self.namespace.versions.held(versions.split(spec.model_id)[0]).values())
        instances: dict[str, set[str]] = {}
        for model_id in every:  # every version, as Triton unloads a model
            try:
                instances[model_id] = await self._unload(model_id, deadline)
            except MeshError as exc:
                raise self.namespace.renamed(exc, model_id, name) from None

        def stopped() -> bool:
            return not any(c.instance_id in held for m, held in instances.items() for c in self.table.ready(m))

        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + UNLOAD_WAIT_S)):
                await self.state.wait_for(stopped, None)
        except TimeoutError:
            log.info("unload of %s: copies still serving after the wait; they drain on their pods", spec.model_id)
        return ext.RepositoryModelUnloadResponse()

    async def _unload(self, model_id: str, deadline: float) -> set[str]:
        """Placement leader's UnloadModel, retried on the next leader until `deadline`."""
        loop = asyncio.get_running_loop()
        request = internal_pb2.UnloadModelRequest(model_id=model_id)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise errors.DeadlineExceeded(f"model '{model_id}' was not unloaded before the deadline; retry")
            leader = self.state.leader
            if leader is not None:
                stub = internal_pb2_grpc.PlacementStub(self.placement.get(leader.address))
                try:
                    response = await stub.UnloadModel(request, timeout=remaining)
                    return set(response.instance_ids)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise Unavailable(f"placement could not unload model '{model_id}': "
                                          f"{exc.code().name}: {exc.details()}") from None
                    log.info("placement leader %s unavailable for an unload: %s", leader.address, exc.details())
            address = leader.address if leader else None
            try:
                await self.state.wait_for(
                    lambda was=address: (ld := self.state.leader) is not None and ld.address != was,  # type: ignore[misc]
                    min(0.5, remaining))
            except TimeoutError:
                pass

    def _check_repository(self, repository_name: str) -> None:
        if repository_name and self.repository is None:
            raise NotFound(f"no model repository {quote_id(repository_name)}: this router serves the mesh's "
                           "registry only (leave repository_name empty)")


def _versioned(name: str, internal: str) -> str:
    """`name` as the caller gave it, with the version of `internal` ("m@2") when it has one."""
    version = versions.version_of(internal)
    return name if version == VERSION else f"{name}{versions.SEP}{version}"


def _empty(shown: str) -> ext.ModelStatistics:
    name, version = versions.split(shown)  # "m@2": model "m", version "2"
    stats = ext.ModelStatistics(name=name, version=version)
    stats.inference_stats.SetInParent()
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                  "cache_hit", "cache_miss"):
        getattr(stats.inference_stats, field).SetInParent()
    return stats


def _duration(into: ext.StatisticDuration, one: ext.StatisticDuration) -> None:
    into.count += one.count
    into.ns += one.ns


def _add(into: ext.ModelStatistics, one: ext.ModelStatistics) -> None:
    into.last_inference = max(into.last_inference, one.last_inference)
    into.inference_count += one.inference_count
    into.execution_count += one.execution_count
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _duration(getattr(into.inference_stats, field), getattr(one.inference_stats, field))
    by_size = {b.batch_size: b for b in into.batch_stats}
    for b in one.batch_stats:
        mine = by_size.get(b.batch_size)
        if mine is None:
            mine = by_size[b.batch_size] = into.batch_stats.add(batch_size=b.batch_size)
        for field in ("compute_input", "compute_infer", "compute_output"):
            _duration(getattr(mine, field), getattr(b, field))


def _error_of(status: object) -> str:
    copies = getattr(status, "copies", ())
    for c in copies:
        if c.state is CopyState.FAILED and c.error:
            return str(c.error)
    stats = getattr(status, "stats", None)
    return str(stats.last_error) if stats is not None and stats.last_error else ""


def _triton_state(state: ModelState, status: object, error: str) -> tuple[str, str]:
    if state is ModelState.LOADED:
        return _READY, ""
    if state is ModelState.LOADING:
        return _LOADING, ""
    if any(c.state is CopyState.UNLOADING for c in getattr(status, "copies", ())):
        return _UNLOADING, ""
    if state is ModelState.FAILED:
        return _UNAVAILABLE, errors.redact_paths(error) or "load failed"
    return _UNAVAILABLE, "not loaded; the next request or a load loads it"
