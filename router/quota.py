"""Per-tenant quotas in the router, and the admin API's store of them (TenantSpec in etcd).

A tenant's quotas are its TenantSpec (`tenants/<tenant>`, `mesh tenant set`), or the router's
defaults (MESH_ROUTER_TENANT_*) when it has none; 0 means no limit. Enforced here:

- registered models: RegisterModel of a new model beyond `max_models` → RESOURCE_EXHAUSTED
  "tenant quota: N registered models" (a retry of an existing registration is never refused);
  counted on this router's view, registrations of one tenant through one router serialised,
  so through several routers at once a tenant can exceed it by the registrations in progress;
- request rate, per router: a token bucket refilled at `max_requests_per_s` holding one
  second's worth (at least one request); a request finding it empty → RESOURCE_EXHAUSTED with
  grpc-retry-pushback-ms set to when the next token is due;
- requests in flight, per router: at `max_in_flight` → RESOURCE_EXHAUSTED with a hint of the
  tenant's recent request latency.

Inference requests (ModelInfer, each ModelStreamInfer message) count; admins are exempt from
the rate and in-flight quotas (mesh-wide operators, not a tenant's traffic). The memory share
(reserved / cap) is enforced by placement. Per request: one dict read of the tenant's spec
and, only for a tenant with a limit, a clock read and a few float operations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
from collections.abc import Callable

from mesh import types
from mesh.errors import InvalidArgument, NoCapacity, Overloaded, Unavailable
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.metrics import Metrics
from mesh.rpc.status import pushback_ms
from mesh.settings import RouterSettings
from mesh.state import MeshState
from mesh.types import TenantSpec
from router.auth import Principal

_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MAX_COUNT = 1 << 31
MAX_RATE = 1e9


class _Usage:
    """One tenant's bookkeeping in this router."""

    __slots__ = ("tokens", "stamp", "rate", "in_flight", "mean_s")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = max(rate, 1.0)  # starts full
        self.stamp = now
        self.in_flight = 0
        self.mean_s = 0.0  # EWMA of the tenant's request durations (the in-flight hint)


class Quotas:
    def __init__(self, state: MeshState, settings: RouterSettings, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.clock = clock
        self.defaults = TenantSpec(
            tenant="", max_models=settings.tenant_max_models,
            max_requests_per_s=settings.tenant_max_requests_per_s, max_in_flight=settings.tenant_max_in_flight)
        self._usage: dict[str, _Usage] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._shed_rate = metrics.shed.labels(metrics.service, "tenant_rate")
        self._shed_in_flight = metrics.shed.labels(metrics.service, "tenant_in_flight")

    def of(self, tenant: str) -> TenantSpec:
        """The quotas in force for `tenant` (its TenantSpec, else the defaults)."""
        spec = self.state.tenants.get(tenant)
        return spec if spec is not None else dataclasses.replace(self.defaults, tenant=tenant)

    # -- requests -----------------------------------------------------------------------------

    def free(self, tenant: str) -> bool:
        """Whether `tenant`'s callers have no request quota (rate or in flight) on this router."""
        spec = self.state.tenants.get(tenant) or self.defaults
        return not spec.max_requests_per_s and not spec.max_in_flight

    def admit(self, principal: Principal) -> _Usage | None:
        """Counts one request of `principal` in; give the result to `done` when it ends.
        Raises Overloaded (RESOURCE_EXHAUSTED + pushback) naming the quota it is over."""
        if principal.admin:
            return None
        tenant = principal.tenant
        spec = self.state.tenants.get(tenant) or self.defaults
        rate, cap = spec.max_requests_per_s, spec.max_in_flight
        if not rate and not cap:
            return None
        now = self.clock()
        usage = self._usage.get(tenant)
        if usage is None:
            usage = self._usage[tenant] = _Usage(rate, now)
        if cap and usage.in_flight >= cap:
            self._shed_in_flight.inc()
            ms = pushback_ms(usage.mean_s)
            raise Overloaded(
                f"tenant quota: {cap} requests in flight per router; retry after {ms} ms, or ask "
                "the operator for a larger quota (mesh tenant set --max-in-flight)", ms)
        if rate:
            if usage.rate != rate:  # the quota changed: the bucket's size with it
                usage.rate = rate
                usage.tokens = min(usage.tokens, max(rate, 1.0))
            tokens = min(max(rate, 1.0), usage.tokens + (now - usage.stamp) * rate)
            usage.stamp = now
            if tokens < 1.0:
                usage.tokens = tokens
                self._shed_rate.inc()
                ms = max(1, math.ceil((1.0 - tokens) / rate * 1000))
                raise Overloaded(
                    f"tenant quota: {_rate(rate)} requests/s per router; retry after {ms} ms, or "
                    "ask the operator for a larger quota (mesh tenant set --max-requests-per-s)", ms)
            usage.tokens = tokens - 1.0
        usage.in_flight += 1
        usage.stamp = now
        return usage

    def done(self, usage: _Usage | None, started: float) -> None:
        if usage is not None:
            usage.in_flight -= 1
            usage.mean_s += 0.1 * (self.clock() - started - usage.mean_s)

    # -- registrations ------------------------------------------------------------------------

    def lock(self, tenant: str) -> asyncio.Lock:
        """Serialises one tenant's registrations in this router (the model count is exact here)."""
        lock = self._locks.get(tenant)
        if lock is None:
            lock = self._locks[tenant] = asyncio.Lock()
        return lock

    def check_models(self, tenant: str) -> None:
        """Raises NoCapacity when `tenant` has its quota of registered models already."""
        limit = self.of(tenant).max_models
        if not limit:
            return
        count = sum(1 for spec in self.state.models.values() if spec.tenant == tenant)
        if count >= limit:
            raise NoCapacity(
                f"tenant quota: {limit} registered models; unregister one, or ask the operator "
                "for a larger quota (mesh tenant set --max-models)")


def _rate(rate: float) -> str:
    return str(int(rate)) if rate == int(rate) else f"{rate:g}"


# -- the admin API's store ----------------------------------------------------------------------


def check_tenant(tenant: str) -> str:
    if tenant and not _TENANT.fullmatch(tenant):
        raise InvalidArgument(
            f"invalid tenant {tenant[:80]!r}: use 1-63 characters from A-Z a-z 0-9 . _ -, starting "
            "with a letter or digit, or empty for the default tenant")
    return tenant


def validate(spec: TenantSpec) -> TenantSpec:
    check_tenant(spec.tenant)
    for name in ("max_models", "max_in_flight", "memory_reserved_bytes", "memory_cap_bytes"):
        value = getattr(spec, name)
        if value < 0 or value > (MAX_COUNT if name.startswith("max") else 1 << 62):
            raise InvalidArgument(f"invalid {name} {value}: give 0 (no limit) or a positive number")
    rate = spec.max_requests_per_s
    if not math.isfinite(rate) or rate < 0 or rate > MAX_RATE:
        raise InvalidArgument(f"invalid max_requests_per_s {rate}: give 0 (no limit) or a positive rate")
    if spec.memory_cap_bytes and spec.memory_reserved_bytes > spec.memory_cap_bytes:
        raise InvalidArgument(
            f"memory_reserved_bytes ({spec.memory_reserved_bytes}) is larger than memory_cap_bytes "
            f"({spec.memory_cap_bytes})")
    return spec


class TenantStore:
    """SetTenant / GetTenant / ListTenants / DeleteTenant: writes to etcd, reads from the view;
    a write is answered once this router's view shows it (as registrations are)."""

    def __init__(self, client: EtcdClient, keys: Keys, state: MeshState, quotas: Quotas,
                 default_deadline_s: float) -> None:
        self.client = client
        self.keys = keys
        self.state = state
        self.quotas = quotas
        self.default_deadline_s = default_deadline_s

    async def set(self, spec: TenantSpec, budget_s: float | None) -> TenantSpec:
        spec = validate(spec)
        try:
            revision = await self.client.put(self.keys.tenant(spec.tenant), types.encode(spec))
        except Unavailable as exc:
            raise Unavailable(f"etcd did not confirm the quotas of tenant {spec.tenant!r} ({exc.message}); "
                              "retry SetTenant (that is safe)") from None
        await self._until(lambda: self.state.view.revision >= revision, budget_s)
        return spec

    async def delete(self, tenant: str, budget_s: float | None) -> bool:
        check_tenant(tenant)
        try:
            existed = await self.client.delete(self.keys.tenant(tenant)) > 0
        except Unavailable as exc:
            raise Unavailable(f"etcd did not confirm the deletion of tenant {tenant!r}'s quotas "
                              f"({exc.message}); retry DeleteTenant (that is safe)") from None
        await self._until(lambda: tenant not in self.state.tenants, budget_s)
        return existed

    def get(self, tenant: str) -> tuple[TenantSpec, bool, int]:
        """(quotas in force, whether they are the defaults, registered models)."""
        check_tenant(tenant)
        count = sum(1 for spec in self.state.models.values() if spec.tenant == tenant)
        return self.quotas.of(tenant), tenant not in self.state.tenants, count

    def list(self) -> list[tuple[TenantSpec, bool, int]]:
        """Every tenant with quotas stored or a model registered, by name."""
        names = set(self.state.tenants) | {spec.tenant for spec in self.state.models.values()}
        return [self.get(name) for name in sorted(names)]

    async def _until(self, done: Callable[[], bool], budget_s: float | None) -> None:
        if done():
            return
        budget = self.default_deadline_s if budget_s is None else budget_s
        try:
            await self.state.wait_for(done, max(budget - min(0.2, budget / 10), 0.001))
        except TimeoutError:
            raise Unavailable("the quotas were written, but this router does not show them yet; "
                              "retry shortly") from None
