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
import re
from collections.abc import Iterable
from typing import Any

from mesh.errors import InvalidArgument, MeshError, PermissionDenied
from mesh.state import MeshState
from mesh.types import ModelSpec
from router import auth, modelid, wire
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

    def __init__(self, state: MeshState) -> None:
        self.state = state

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
        """(public id, the model or None when absent to this caller, request bytes to forward).

        The id comes from the mm-vmodel-id / mm-model-id metadata, else field 1 (as
        modelid.resolve); the forwarded bytes name the internal id in a last field 1, appended
        at most once (none at all for the default tenant's and an admin's own ids)."""
        header = modelid.from_metadata(metadata)
        body = modelid.model_name(request)
        public = header or body
        if not public:
            raise InvalidArgument("no model id: set ModelInferRequest.model_name or the mm-model-id header")
        spec = self.lookup(principal, public)
        if spec is None:
            return public, None, request
        if spec.model_id != body:
            request = request + wire.string(1, spec.model_id)
        return public, spec, request

    @staticmethod
    def response(public: str, internal: str, response: bytes) -> bytes:
        """The pod's ModelInferResponse with model_name (field 1) the caller's id again."""
        return response if internal == public else response + wire.string(1, public)

    @staticmethod
    def renamed(exc: MeshError, internal: str, public: str) -> MeshError:
        """`exc` with the internal id in its message replaced by the public one (same class,
        same retry hint), so a tenant's errors name only its own ids."""
        if internal != public and internal in exc.message:
            exc.args = (rename(exc.message, internal, public), *exc.args[1:])
        return exc
