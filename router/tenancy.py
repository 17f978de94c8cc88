"""Tenant namespaces of model ids: which models a caller sees, calls, registers and unregisters.

A tenant names its models by *public* ids (no ':' allowed). The mesh stores and routes every
model by its *internal* id: `<tenant>:<public id>` for a named tenant, the public id itself for
the default tenant "" (so the default tenant's ids, data and clients are unchanged). Tenant
names cannot contain ':' either, so the split is unambiguous. Etcd keys, placement, pods,
copies, stats and usage telemetry only ever see internal ids; the router translates at its
edge:

- a lookup for a non-admin caller builds the internal id from the caller's tenant and the
  public id, and a model of another tenant is simply not at that key: it answers exactly as an
  absent one (the same NOT_FOUND, the same message, the same code path), on every RPC;
- registering an id another tenant uses creates a different key, so it cannot collide and
  cannot reveal that the other exists;
- a forwarded ModelInferRequest gets the internal id appended as field 1 (the last field 1
  wins, as in protobuf), and the pod's ModelInferResponse gets the public id appended the same
  way; the router's and the pods' error messages have the internal id replaced by the public
  one;
- an admin principal addresses models by their internal ids (`acme:m1`; the default tenant's
  `m1`) and sees every tenant's.

Models registered with a tenant before namespacing existed (key `models/m1`, tenant `acme`)
are still found for their tenant (a second dict read, only on a miss of a named tenant).
Per request this costs one context-variable read, one f-string and a dict read for a named
tenant's call, and two byte appends (request and response); see docs/SECURITY.md.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable
from typing import Any

from mesh.errors import InvalidArgument, MeshError, PermissionDenied
from mesh.state import MeshState
from mesh.types import ModelSpec, VModelRecord
from router import auth, modelid, versions, vmodels, wire
from router.auth import Principal

SEP = ":"
_QUOTED_MODEL = re.compile(r"model '([^']*)'")


def caller() -> Principal:
    """The principal of the RPC being handled (bound by the authentication layer)."""
    return auth.current()


def internal_id(tenant: str, public: str) -> str:
    return f"{tenant}{SEP}{public}" if tenant else public


def public_id(spec: ModelSpec) -> str:
    """The id the model's own tenant knows it by."""
    prefix = spec.tenant + SEP
    if spec.tenant and spec.model_id.startswith(prefix):
        return spec.model_id[len(prefix):]
    return spec.model_id


def rename(text: str, internal: str, public: str) -> str:
    """`text` (an error message) with the internal id replaced by the public one."""
    return text.replace(internal, public) if internal != public else text


class Namespace:
    """The translation between a caller's ids and the mesh's, over the watched MeshState."""

    def __init__(self, state: MeshState, rng: random.Random | None = None) -> None:
        self.state = state
        self._rng = rng or random.Random()  # vmodels' weighted picks
        self.versions = versions.Index(state)  # model id -> its registered versions

    # -- lookups ------------------------------------------------------------------------------

    def lookup(self, principal: Principal, name: str) -> ModelSpec | None:
        """The model `name` means to `principal`, or None: absent, or another tenant's (the
        caller cannot tell which, and neither do the errors built from None)."""
        models = self.state.models
        if principal.admin:
            return models.get(name)
        if SEP in name:
            return None  # never a public id: an attempt at another tenant's internal id
        tenant = principal.tenant
        spec = models.get(f"{tenant}{SEP}{name}" if tenant else name)
        if spec is None and tenant:
            spec = models.get(name)  # registered with this tenant before ids were namespaced
        if spec is None or spec.tenant != tenant:
            return None
        return spec

    def lookup_version(self, principal: Principal, name: str, version: str) -> ModelSpec | None:
        """As `lookup`, for `version` of the model ("" = the highest; router/versions.py).
        NotFound for a version a model the caller sees lacks."""
        if principal.admin:
            bases = [name]
        elif SEP in name:
            bases = []
        else:  # its namespaced id, then a registration from before ids were namespaced
            bases = [internal_id(principal.tenant, name)] + ([name] if principal.tenant else [])
        return versions.lookup(self.state, self.versions, lambda s: self.visible(principal, s), bases, name, version)

    def visible(self, principal: Principal, spec: ModelSpec) -> bool:
        return principal.admin or spec.tenant == principal.tenant

    def shown_id(self, principal: Principal, spec: ModelSpec) -> str:
        """The id `principal` knows `spec` by: internal for an admin, public for its tenant."""
        return spec.model_id if principal.admin else public_id(spec)

    def shown(self, principal: Principal, spec: ModelSpec) -> ModelSpec:
        shown = self.shown_id(principal, spec)
        if shown == spec.model_id:
            return spec
        return dataclasses.replace(spec, model_id=shown)

    def scrub(self, principal: Principal, text: str) -> str:
        """Placement's texts about a model (its last decision) may name other models ("evicted
        for model 'x'"): each quoted model id becomes the id the caller knows it by, or "another
        model" when the caller may not see it."""
        if principal.admin or "model '" not in text:
            return text

        def one(match: re.Match[str]) -> str:
            spec = self.state.models.get(match.group(1))
            if spec is not None and self.visible(principal, spec):
                return f"model '{public_id(spec)}'"
            return "another model"

        return _QUOTED_MODEL.sub(one, text)

    # -- registration -------------------------------------------------------------------------

    def owner(self, principal: Principal, spec: ModelSpec) -> tuple[str, str]:
        """(tenant, public id) a registration is for. A tenant registers into its own tenant
        only (spec.tenant empty or its own; anything else PERMISSION_DENIED, which reveals
        nothing about other tenants' models); an admin names the tenant in spec.tenant or in
        an internal id `tenant:id`."""
        tenant, public = spec.tenant, spec.model_id
        if principal.admin:
            if SEP in public:
                named, _, public = public.partition(SEP)
                if tenant and tenant != named:
                    raise InvalidArgument(
                        f"model_id names tenant {named[:80]!r} but tenant is {tenant[:80]!r}: give one")
                tenant = named
            return tenant, public
        if tenant and tenant != principal.tenant:
            raise PermissionDenied(
                "a caller registers models of its own tenant only (an admin token may name "
                "another): leave tenant empty or give your own")
        return principal.tenant, public

    def key_id(self, principal: Principal, tenant: str, public: str) -> str:
        """The internal id a registration of (tenant, public) is stored under: an existing
        (pre-namespacing) registration's own id, else the namespaced one."""
        existing = self.lookup(Principal(tenant=tenant), public)
        return existing.model_id if existing is not None else internal_id(tenant, public)

    # -- the data path ------------------------------------------------------------------------

    def route(
        self, principal: Principal, metadata: Iterable[tuple[str, Any]] | None, request: bytes
    ) -> tuple[str, ModelSpec | None, bytes]:
        """(public id, the model or None when absent to this caller, request bytes to forward)."""
        public, spec, request, _ = self.route_vmodel(principal, metadata, request)
        return public, spec, request

    def route_vmodel(
        self, principal: Principal, metadata: Iterable[tuple[str, Any]] | None, request: bytes
    ) -> tuple[str, ModelSpec | None, bytes, str]:
        """As `route`, with the internal name of the vmodel the request named ("" if none).

        The id comes from the mm-vmodel-id / mm-model-id metadata, else field 1 (as
        modelid.resolve); a vmodel's name resolves to one of its targets (router/vmodels.py),
        and the public id returned is then the concrete model's (the response names it). The
        forwarded bytes name the internal id in a last field 1, appended at most once (none at
        all for the default tenant's and an admin's own ids)."""
        vheader, mheader = modelid.headers(metadata)
        body = modelid.model_name(request)
        name = vheader or mheader or body
        if not name:
            raise InvalidArgument("no model id: set ModelInferRequest.model_name or the mm-model-id header")
        version = wire.string_field(request, 2)  # model_version (router/versions.py)
        public, spec, vmodel = self.resolve(principal, name, metadata, vmodel_first=bool(vheader), version=version)
        if spec is None:
            return public, None, request, vmodel
        if spec.model_id != body:
            request = request + wire.string(1, spec.model_id)
        if not vmodel:
            request = versions.forwarded(request, version)
        return public, spec, request, vmodel

    def vmodel(self, principal: Principal, name: str) -> VModelRecord | None:
        """The vmodel `name` means to `principal` (as `lookup` for models), or None."""
        vms = self.state.vmodels
        if not vms:
            return None
        if principal.admin:
            return vms.get(name)
        if SEP in name:
            return None
        record = vms.get(internal_id(principal.tenant, name))
        return record if record is not None and record.tenant == principal.tenant else None

    def resolve(
        self, principal: Principal, name: str, metadata: Iterable[tuple[str, Any]] | None,
        vmodel_first: bool = False, control: bool = False, version: str = "",
    ) -> tuple[str, ModelSpec | None, str]:
        """(the id to show for the concrete model, the model or None, the vmodel's internal
        name or ""). `vmodel_first`: the name came as mm-vmodel-id (a vmodel wins over a
        model of the same name). `control`: a ModelReady / ModelMetadata, answered for the
        vmodel's primary target (router/vmodels.py) rather than a random pick. `version`: the
        request's model_version ("" = the highest; router/versions.py)."""
        spec = None if vmodel_first else self.lookup_version(principal, name, version)
        if spec is not None:
            return name, spec, ""
        record = self.vmodel(principal, name)
        if record is None:
            return name, (self.lookup_version(principal, name, version) if vmodel_first else None), ""
        headers = vmodels.text_headers(metadata)
        target = vmodels.primary(record, headers) if control else vmodels.pick(record, headers, self._rng)
        spec = self.state.models.get(target)
        if spec is None:  # a target unregistered since: NOT_FOUND, naming neither tenant nor key
            return (target.partition(SEP)[2] or target) if target else name, None, record.name
        return self.shown_id(principal, spec), spec, record.name

    @staticmethod
    def response(public: str, internal: str, response: bytes) -> bytes:
        """The pod's ModelInferResponse with model_name (field 1) the caller's id again, and
        model_version (field 2) the version that answered (router/versions.py)."""
        response = versions.response(response, internal)
        return response if internal == public else response + wire.string(1, public)

    @staticmethod
    def renamed(exc: MeshError, internal: str, public: str) -> MeshError:
        """`exc` with the internal id in its message replaced by the public one (same class,
        same retry hint), so a tenant's errors name only its own ids."""
        if internal != public and internal in exc.message:
            exc.args = (rename(exc.message, internal, public), *exc.args[1:])
        return exc
