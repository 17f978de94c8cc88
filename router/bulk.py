"""Many registrations in one call (RegisterModels: `mesh register --repository`).

Each spec is validated and namespaced exactly as RegisterModel does it (router/registry.py); a
spec that fails gets its own result and the others go on. The writes are etcd transactions of
at most CHUNK creates each (etcd's default limit is 128 operations per transaction), each key
created only if absent; a chunk whose transaction finds a key taken falls back to one create
per key, so a concurrent registration decides only its own model's result. A changed spec
with `replace` is an update: the old registration is deleted first (placement then removes
its assignments and the pods unload it) and, once this router's view shows no assignment of
it, created again, so the pods load the new artifact; no copy ever serves a spec it was not
loaded from. The call answers once this router's view shows every write (read your writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mesh import types
from mesh.errors import AlreadyExists, Conflict, InvalidArgument, MeshError, NoCapacity, Unavailable
from mesh.kv.etcd import CREATE, compare, delete_op, put_op
from mesh.types import ModelSpec
from router import versions
from router.auth import Principal

if TYPE_CHECKING:
    from router.registry import Registry

MAX_MODELS = 1000  # specs in one call
CHUNK = 64  # creates (or deletes) per etcd transaction
UNLOAD_WAIT_S = 15.0  # longest an update waits for placement to remove the old copies


@dataclasses.dataclass(frozen=True)
class Result:
    model_id: str  # as the caller gave it
    error: MeshError | None = None
    action: str = ""  # created / updated / unchanged


@dataclasses.dataclass
class _Item:
    index: int
    spec: ModelSpec  # validated, under its internal id
    shown: str  # the id the caller's messages name
    update: bool = False


async def register_many(registry: Registry, principal: Principal, specs: Sequence[ModelSpec], replace: bool,
                        budget_s: float | None = None) -> list[Result]:
    from router import registry as reg

    if len(specs) > MAX_MODELS:
        raise InvalidArgument(f"RegisterModels takes at most {MAX_MODELS} models per call, not {len(specs)}")
    deadline = registry._deadline(budget_s)
    results: list[Result | None] = [None] * len(specs)
    items: list[_Item] = []
    seen: set[str] = set()
    for i, given in enumerate(specs):
        try:
            tenant, public = registry.namespace.owner(principal, given)
            spec = reg.validate(dataclasses.replace(given, model_id=public, tenant=tenant), registry.settings)
            internal = versions.concrete_id(registry.namespace.key_id(principal, tenant, public), spec.version)
            if internal in seen:
                raise InvalidArgument(f"model '{public}' is given twice in this call")
            seen.add(internal)
            await reg.check_resolved_host(spec.storage_uri, registry.settings, deadline)
            spec = dataclasses.replace(spec, model_id=internal, registered_unix_ms=registry.clock.unix_ms(),
                                       artifact_bytes=await reg.artifact_bytes(spec.storage_uri, deadline))
        except MeshError as exc:
            results[i] = Result(given.model_id, exc)
            continue
        shown = internal if principal.admin else public
        existing = registry.state.models.get(internal)
        if existing is not None and reg._as_registered(existing) == reg._as_registered(spec):
            results[i] = Result(given.model_id, action="unchanged")
        elif existing is not None and not replace:
            results[i] = Result(given.model_id, AlreadyExists(f"model '{shown}' is already registered with "
                                                              "another spec (replace: update it)"))
        else:
            items.append(_Item(i, spec, shown, update=existing is not None))
    async with contextlib.AsyncExitStack() as stack:
        tenants = sorted({item.spec.tenant for item in items})
        for tenant in tenants:
            if registry.quotas.of(tenant).max_models:
                await stack.enter_async_context(registry.quotas.lock(tenant))
        items = _within_quotas(registry, items, specs, results)
        await _write(registry, items, specs, results, deadline)
    return [r if r is not None else Result(specs[i].model_id, Unavailable("not written; retry"))
            for i, r in enumerate(results)]


def _within_quotas(registry: Registry, items: list[_Item], specs: Sequence[ModelSpec],
                   results: list[Result | None]) -> list[_Item]:
    """The items the tenants' max_models quotas leave room for (an update never counts)."""
    counts: dict[str, int] = {}
    kept = []
    for item in items:
        tenant = item.spec.tenant
        limit = registry.quotas.of(tenant).max_models
        if limit and not item.update:
            if tenant not in counts:
                counts[tenant] = sum(1 for s in registry.state.models.values() if s.tenant == tenant)
            if counts[tenant] >= limit:
                results[item.index] = Result(specs[item.index].model_id, NoCapacity(
                    f"tenant quota: {limit} registered models; unregister one, or ask the operator for a "
                    "larger quota (mesh tenant set --max-models)"))
                continue
            counts[tenant] += 1
        kept.append(item)
    return kept


async def _write(registry: Registry, items: list[_Item], specs: Sequence[ModelSpec],
                 results: list[Result | None], deadline: float) -> None:
    state, keys = registry.state, registry.keys
    updates = [i for i in items if i.update]
    for chunk in _chunks(updates):
        try:
            await registry.client.txn([], [delete_op(keys.model(i.spec.model_id)) for i in chunk])
        except Unavailable as exc:
            for i in chunk:
                items.remove(i)
                results[i.index] = Result(specs[i.index].model_id, _indeterminate(i.shown, exc))
    if updates:
        gone = {i.spec.model_id for i in updates if i in items}
        loop = asyncio.get_running_loop()
        try:
            await state.wait_for(lambda: not any(m in gone for m in state.models)
                                 and not any(m in gone for a in state.assignments.values() for m in a),
                                 max(0.001, min(deadline - loop.time() - 0.5, UNLOAD_WAIT_S)))
        except TimeoutError:
            for i in [i for i in items if i.update and _assigned(registry, i.spec.model_id)]:
                items.remove(i)
                results[i.index] = Result(specs[i.index].model_id, Unavailable(
                    f"model '{i.shown}' was unregistered to update it, but placement has not removed its "
                    "copies yet; retry the registration shortly (that is safe)"))
    revision = 0
    for chunk in _chunks(items):
        try:
            revision = max(revision, await _create(registry, chunk, specs, results))
        except Unavailable as exc:
            for i in chunk:
                results[i.index] = Result(specs[i.index].model_id, _indeterminate(i.shown, exc))
    if revision:
        try:
            await registry._until_visible(lambda: state.view.revision >= revision, deadline, "")
        except Unavailable:
            for i in items:
                r = results[i.index]
                if r is not None and r.error is None:
                    results[i.index] = Result(r.model_id, Unavailable(
                        f"model '{i.shown}' is registered, but this router does not show it yet; retry "
                        "shortly (the same spec answers OK)"))


async def _create(registry: Registry, chunk: list[_Item], specs: Sequence[ModelSpec],
                  results: list[Result | None]) -> int:
    """Creates the chunk's keys in one transaction, else one by one; returns the revision."""
    keys = registry.keys
    ok, revision = await registry.client.txn(
        [compare(keys.model(i.spec.model_id), CREATE, 0) for i in chunk],
        [put_op(keys.model(i.spec.model_id), types.encode(i.spec)) for i in chunk])
    if ok:
        for i in chunk:
            results[i.index] = Result(specs[i.index].model_id, action="updated" if i.update else "created")
        return revision
    for i in chunk:  # someone registered one of them meanwhile: each decides its own result
        key = keys.model(i.spec.model_id)
        try:
            revision = max(revision, await registry.client.create(key, types.encode(i.spec)))
            results[i.index] = Result(specs[i.index].model_id, action="updated" if i.update else "created")
        except Conflict:
            try:
                revision = max(revision, await registry._same_spec_revision(key, i.spec, i.shown))
                results[i.index] = Result(specs[i.index].model_id, action="unchanged")
            except MeshError as exc:
                results[i.index] = Result(specs[i.index].model_id, exc)
    return revision


def _assigned(registry: Registry, model_id: str) -> bool:
    return any(model_id in a for a in registry.state.assignments.values())


def _indeterminate(shown: str, exc: Unavailable) -> Unavailable:
    return Unavailable(f"etcd did not confirm the registration of model '{shown}' ({exc.message}); it may or "
                       "may not have been written: retry (the same spec is safe)")


def _chunks(items: list[_Item]) -> list[list[_Item]]:
    return [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
