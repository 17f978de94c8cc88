"""The model registry: validation of specs, registration in etcd, status from MeshState.

Every rule a spec breaks is answered with InvalidArgument naming the field and what is
accepted. Storage URIs go through mesh/uripolicy.py (the policy the pods apply again when they
fetch): no credentials in them (use credentials_ref), file:// only under the configured roots
on canonical paths (none configured: refused), http(s) only to public addresses unless
allow-listed, and the tenant's prefixes; those refusals are PermissionDenied. Reads come from the watched MeshState; writes go to etcd and are
answered OK only once this router's view shows them (read your writes), so a registration
answered OK is routable here at once; when the view cannot confirm it within the caller's
deadline the answer is UNAVAILABLE, saying the write was made. Retrying a registration of the
identical spec answers OK (not ALREADY_EXISTS), so a client can always retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import ipaddress
import os
import re
import socket
import stat
import urllib.parse
from collections.abc import Callable, Mapping

from mesh import errors, types, uripolicy
from mesh.clock import Clock
from mesh.errors import AlreadyExists, Conflict, InvalidArgument, MeshError, Unavailable
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.settings import RouterSettings
from mesh.state import MeshState
from mesh.types import CopyRecord, CopyState, Decision, ModelSpec, ModelStats
from router import bulk, versions
from router.auth import Principal
from router.quota import Quotas
from router.tenancy import Namespace, internal_id

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
MAX_COPIES = 64
MAX_BATCH = 4096
MAX_QUEUE_DELAY_US = 1_000_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CREDENTIALS_REF = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,251}[a-z0-9])?")
MAX_URI = uripolicy.MAX_URI
RESOLVE_TIMEOUT_S = 2.0  # longest a registration waits for DNS of an http(s) host
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
DEFAULT_PAGE = 100
MAX_PAGE = 1000
STAT_TIMEOUT_S = 2.0  # longest wait for a file:// artifact's size (a slow network filesystem)


class ModelState(enum.Enum):
    NOT_LOADED = "NOT_LOADED"
    LOADING = "LOADING"
    LOADED = "LOADED"
    FAILED = "FAILED"


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    spec: ModelSpec
    state: ModelState
    copies: tuple[CopyRecord, ...] = ()
    stats: ModelStats | None = None
    decision: Decision | None = None


# -- validation ---------------------------------------------------------------------------------


def unknown_model(state: MeshState, model_id: str) -> MeshError:
    """The error for a model this router's view does not have. NOT_FOUND tells clients not to
    retry, so it is only said while the view is connected to etcd; before its first list or
    while its watch is broken the model may well exist: UNAVAILABLE."""
    if not state.view.connected:
        return Unavailable(f"model {errors.quote_id(model_id)} is not known to this router right now (its view of "
                           "etcd is not connected); retry")
    return errors.model_not_found(model_id)


def check_model_id(model_id: str) -> str:
    if not _MODEL_ID.fullmatch(model_id) or model_id in (".", ".."):
        raise InvalidArgument(
            f"invalid model_id {errors.quote_id(model_id)}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return model_id


def check_storage_uri(uri: str, settings: RouterSettings, tenant: str = "") -> str:
    """Refuses a URI meshserve must not fetch (mesh/uripolicy.py): malformed, carrying
    credentials, file:// outside the roots (or with none configured), an http(s) host that is
    a non-public address literal, or outside the tenant's prefixes. Host names are resolved
    later (`check_resolved_host`), and again by the pod when it connects."""
    parts = uripolicy.parse(uri, settings.schemes(), "MESH_ROUTER_ALLOWED_SCHEMES")
    scheme = parts.scheme.lower()
    if scheme == "file":
        path = uripolicy.file_path(uri, parts)
        uripolicy.FileRoots.parse(settings.file_roots, "MESH_ROUTER_FILE_ROOTS").check_registration(uri, path)
    elif scheme in ("http", "https"):
        _egress(settings).check_literal(uri, parts)
        if len(parts.path) > 1 and parts.path.endswith("/"):
            raise InvalidArgument(f"invalid storage_uri {uripolicy.show(uri)}: an http(s) URI names one file; "
                                  "serve a model folder (model.onnx with external data) from file:// or s3://")
    elif not parts.netloc:
        raise InvalidArgument(f"invalid storage_uri {uripolicy.show(uri)}: a {scheme} URI needs a host")
    uripolicy.TenantPrefixes.parse(
        settings.tenant_storage_prefixes, "MESH_ROUTER_TENANT_STORAGE_PREFIXES").check(uri, parts, tenant)
    return uri


def _egress(settings: RouterSettings) -> uripolicy.Egress:
    return uripolicy.Egress.parse(settings.allowed_networks, settings.allowed_hosts, "MESH_ROUTER")


async def check_resolved_host(uri: str, settings: RouterSettings, deadline: float) -> None:
    """An http(s) host name that resolves here to a non-public address is refused at
    registration. A name that does not resolve here (the pods' DNS may differ), or not in
    time, is accepted: the pod resolves it again and checks the address it connects to."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    if parts.scheme.lower() not in ("http", "https") or uripolicy.host_literal(host) is not None:
        return
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(min(deadline, loop.time() + RESOLVE_TIMEOUT_S)):
            infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return
    egress = _egress(settings)
    for info in infos:
        egress.check(uri, ipaddress.ip_address(info[4][0]), host, literal=False)


def check_credentials_ref(spec: ModelSpec) -> None:
    ref = spec.credentials_ref
    if not ref:
        return
    if not _CREDENTIALS_REF.fullmatch(ref):
        raise InvalidArgument(
            f"invalid credentials_ref {errors.quote_id(ref, 80)}: give the name of a Secret (1-253 "
            "characters from a-z 0-9 . - _, starting and ending with a letter or digit)")
    if urllib.parse.urlsplit(spec.storage_uri).scheme.lower() not in ("http", "https", "s3"):
        raise InvalidArgument("credentials_ref is only used with http(s) and s3 storage URIs")


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)}): at most {MAX_LABELS}")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"invalid label key {key[:80]!r}: use 1-63 characters from A-Z a-z 0-9 . _ - /, "
                "starting with a letter or digit"
            )
        if len(value) > MAX_LABEL_VALUE or _CONTROL.search(value):
            raise InvalidArgument(
                f"invalid value of label {key!r}: at most {MAX_LABEL_VALUE} characters, "
                "no control characters"
            )
    return dict(labels)


def validate(spec: ModelSpec, settings: RouterSettings) -> ModelSpec:
    """The spec as it will be stored (format and sha256 normalised); raises InvalidArgument."""
    check_model_id(spec.model_id)
    if spec.tenant and not _TENANT.fullmatch(spec.tenant):
        raise InvalidArgument(
            f"invalid tenant {spec.tenant[:80]!r}: use 1-63 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, or leave it empty"
        )
    check_storage_uri(spec.storage_uri, settings, spec.tenant)
    check_credentials_ref(spec)
    fmt = spec.format.lower()
    if fmt not in ("", "onnx"):
        raise InvalidArgument(f"invalid format {spec.format[:40]!r}: only 'onnx' is supported")
    if spec.sha256 and not _SHA256.fullmatch(spec.sha256):
        raise InvalidArgument("invalid sha256: give the artifact's digest as 64 hex characters, or leave it empty")
    labels = check_labels(spec.labels)
    check_serving_options(spec)
    return dataclasses.replace(spec, format="onnx", sha256=spec.sha256.lower(), labels=labels,
                               version=versions.check(spec.version))


def check_serving_options(spec: ModelSpec) -> None:
    if spec.max_copies and spec.min_copies > spec.max_copies:
        raise InvalidArgument(
            f"min_copies ({spec.min_copies}) is larger than max_copies ({spec.max_copies})")
    if spec.min_copies > MAX_COPIES or spec.max_copies > MAX_COPIES:
        raise InvalidArgument(f"copy bounds are limited to {MAX_COPIES}")
    if spec.max_batch_size > MAX_BATCH:
        raise InvalidArgument(f"max_batch_size is limited to {MAX_BATCH}")
    if spec.max_queue_delay_us > MAX_QUEUE_DELAY_US:
        raise InvalidArgument(f"max_queue_delay_us is limited to {MAX_QUEUE_DELAY_US} (1 s)")


# -- the registry -------------------------------------------------------------------------------


class Registry:
    def __init__(
        self, client: EtcdClient, keys: Keys, state: MeshState, settings: RouterSettings, clock: Clock,
        quotas: Quotas,
    ) -> None:
        self.client = client
        self.keys = keys
        self.state = state
        self.settings = settings
        self.clock = clock
        self.quotas = quotas
        self.namespace = Namespace(state)  # tenants' ids <-> the mesh's (router/tenancy.py)

    async def register(self, principal: Principal, spec: ModelSpec, budget_s: float | None = None) -> ModelStatus:
        """Creates models/<internal id> for `principal`'s tenant (an admin: the tenant the spec
        names); OK once this router's view shows it. `budget_s`: the caller's remaining time
        (None: the default deadline)."""
        tenant, public = self.namespace.owner(principal, spec)
        spec = dataclasses.replace(spec, model_id=public, tenant=tenant)
        spec = validate(spec, self.settings)
        # Version N ≥ 2 is its own model, stored as "<id>@<N>" (router/versions.py).
        internal = versions.concrete_id(self.namespace.key_id(principal, tenant, public), spec.version)
        spec = dataclasses.replace(spec, model_id=internal)
        shown = internal if principal.admin else public  # the id the caller's messages name
        if not self.quotas.of(tenant).max_models:
            return self.namespace_status(principal, await self._register(spec, shown, budget_s))
        async with self.quotas.lock(tenant):  # the model count is exact on this router
            if internal not in self.state.models:  # a retried registration is never refused
                self.quotas.check_models(tenant)
            return self.namespace_status(principal, await self._register(spec, shown, budget_s))

    async def register_many(self, principal: Principal, specs: list[ModelSpec], replace: bool,
                            budget_s: float | None = None) -> list[bulk.Result]:
        """RegisterModels: one result per spec (router/bulk.py)."""
        return await bulk.register_many(self, principal, specs, replace, budget_s)

    async def _register(self, spec: ModelSpec, model_id: str, budget_s: float | None) -> ModelStatus:
        """Registers the validated `spec` (its internal id); `model_id` is the caller's id, for
        messages."""
        deadline = self._deadline(budget_s)
        await check_resolved_host(spec.storage_uri, self.settings, deadline)
        spec = dataclasses.replace(spec, registered_unix_ms=self.clock.unix_ms(),
                                   artifact_bytes=await artifact_bytes(spec.storage_uri, deadline))
        key = self.keys.model(spec.model_id)
        try:
            try:
                revision = await self.client.create(key, types.encode(spec))
            except Conflict:
                revision = await self._same_spec_revision(key, spec, model_id)
        except Unavailable as exc:
            raise Unavailable(
                f"etcd did not confirm the registration of model '{model_id}' ({exc.message}); it may "
                "or may not have been written: retry RegisterModel with the same spec (that is safe)"
            ) from None
        view = self.state.view
        await self._until_visible(
            lambda: view.revision >= revision, deadline,
            f"model '{model_id}' is registered, but this router does not show it yet; retry GetModel "
            "(or RegisterModel with the same spec) shortly")
        return self.status_of(self.state.models.get(spec.model_id, spec))

    async def _same_spec_revision(self, key: str, spec: ModelSpec, model_id: str) -> int:
        """The revision of the registration already at `key` when it is `spec` (a retried
        RegisterModel); raises AlreadyExists when it is another spec."""
        kv = await self.client.get(key)
        if kv is None:
            raise Unavailable(f"model '{model_id}' was unregistered while registering it; retry")
        existing = types.decode(ModelSpec, kv.value)
        if _as_registered(existing) != _as_registered(spec):
            raise AlreadyExists(f"model '{model_id}' is already registered")
        return kv.mod_revision

    async def unregister(self, principal: Principal, model_id: str, budget_s: float | None = None,
                         version: str = "") -> bool:
        """Deletes the model's key (placement removes its copies): every version of it, or
        `version` only; unknown ids and versions, and another tenant's (the same answer),
        succeed with existed=False. OK once this router's view no longer shows them."""
        check_model_id(model_id.partition(":")[2] if principal.admin and ":" in model_id else model_id)
        if version:
            versions.check(version)
        else:
            try:
                latest = self.namespace.lookup_version(principal, model_id, "")
            except MeshError:
                latest = None
            if latest is not None:
                others = sorted(self.namespace.versions.held(versions.split(latest.model_id)[0]).items(), reverse=True)
                existed = False
                for number, _ in others:  # the highest first: "" never names a version just deleted
                    existed = await self.unregister(principal, model_id, budget_s, str(number)) or existed
                return existed
            version = versions.FIRST
        deadline = self._deadline(budget_s)
        try:
            spec = self.namespace.lookup_version(principal, model_id, version)
        except errors.NotFound:
            spec = None  # the model lacks that version: its key is deleted anyway (below)
        if spec is not None:
            internal = spec.model_id
        else:
            # Not in this view: the caller's own key is deleted anyway (registered through
            # another router a moment ago, say); it lies in the caller's namespace, so it is
            # never another tenant's, unless the view shows it is (a pre-namespacing record).
            internal = versions.concrete_id(
                model_id if principal.admin else internal_id(principal.tenant, model_id), version)
            if internal in self.state.models:
                return False  # another tenant's model: answered as an absent one, untouched
        try:
            existed = await self.client.delete(self.keys.model(internal)) > 0
        except Unavailable as exc:
            raise Unavailable(
                f"etcd did not confirm the unregistration of model '{model_id}' ({exc.message}); it "
                "may or may not have happened: retry UnregisterModel (that is safe)") from None
        await self._until_visible(
            lambda: internal not in self.state.models, deadline,
            f"model '{model_id}' is unregistered, but this router still shows it; retry shortly")
        return existed

    def get(self, principal: Principal, model_id: str, version: str = "") -> ModelStatus:
        """The model's status: version 1 for "", or its highest version when it has no version 1."""
        spec = None if version else self.namespace.lookup(principal, model_id)
        if spec is None:
            spec = self.namespace.lookup_version(principal, model_id, version)
        if spec is None:
            raise unknown_model(self.state, model_id)  # another tenant's model: the very same answer
        return self.namespace_status(principal, self.status_of(spec))

    def list(
        self, principal: Principal, page_size: int, page_token: str, tenant: str, labels: Mapping[str, str]
    ) -> tuple[list[ModelStatus], str]:
        """A page of the models `principal` may see, ordered by the id it knows them by, after
        `page_token`; returns it with the next token. A tenant's `tenant` filter other than its
        own matches nothing (as if that tenant had no models)."""
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        page: list[ModelSpec] = []
        more = False
        ns = self.namespace
        if not principal.admin and tenant and tenant != principal.tenant:
            return [], ""
        visible = {ns.shown_id(principal, s): s for s in self.state.models.values() if ns.visible(principal, s)}
        for model_id in sorted(visible):
            if page_token and model_id <= page_token:
                continue
            spec = visible[model_id]
            if tenant and spec.tenant != tenant:
                continue
            if any(spec.labels.get(k) != v for k, v in labels.items()):
                continue
            if len(page) == size:
                more = True
                break
            page.append(spec)
        token = ns.shown_id(principal, page[-1]) if more else ""
        return [self.namespace_status(principal, self.status_of(spec)) for spec in page], token

    def namespace_status(self, principal: Principal, status: ModelStatus) -> ModelStatus:
        """`status` as `principal` may see it: its id the one the caller knows it by, and other
        tenants' model ids taken out of placement's decision text."""
        spec = self.namespace.shown(principal, status.spec)
        base, version = versions.split(spec.model_id)
        if version != versions.FIRST:  # "m@2": model "m", version "2" (router/versions.py)
            spec = dataclasses.replace(spec, model_id=base, version=version)
        decision = status.decision
        if decision is not None:
            decision = dataclasses.replace(decision, reason=self.namespace.scrub(principal, decision.reason))
        if spec is status.spec and decision is status.decision:
            return status
        return dataclasses.replace(status, spec=spec, decision=decision)

    def status_of(self, spec: ModelSpec) -> ModelStatus:
        copies = tuple(self.state.copies.get(spec.model_id, {}).values())
        stats = self.state.stats.get(spec.model_id)
        if self.state.ready_copies(spec.model_id):
            state = ModelState.LOADED
        elif any(c.state is CopyState.LOADING for c in copies):
            state = ModelState.LOADING
        elif any(c.state is CopyState.FAILED for c in copies) or (stats and stats.last_error):
            state = ModelState.FAILED
        else:
            state = ModelState.NOT_LOADED
        return ModelStatus(spec=spec, state=state, copies=copies, stats=stats,
                           decision=self.state.decisions.get(spec.model_id))

    def _deadline(self, budget_s: float | None) -> float:
        budget = self.settings.default_deadline_s if budget_s is None else budget_s
        return asyncio.get_running_loop().time() + budget

    async def _until_visible(self, done: Callable[[], bool], deadline: float, not_yet: str) -> None:
        """Read your writes: returns once `done()` holds in this router's view; raises
        Unavailable(`not_yet`) when it does not before `deadline` (a little before, so the
        answer reaches the caller in time)."""
        if done():
            return
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await self.state.wait_for(done, max(remaining - min(0.2, remaining / 10), 0.001))
        except TimeoutError:
            raise Unavailable(not_yet) from None


def _as_registered(spec: ModelSpec) -> ModelSpec:
    """What a user registered, without what the router adds (time, measured size)."""
    return dataclasses.replace(spec, registered_unix_ms=0, artifact_bytes=0)


async def artifact_bytes(uri: str, deadline: float) -> int:
    """Size of a file:// artifact (placement's first guess at its footprint); 0 when unknown:
    another scheme, no such file yet, or the filesystem too slow to answer (stat runs in a
    thread, never on the event loop)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() != "file":
        return 0
    path = urllib.parse.unquote(parts.path)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(min(deadline, loop.time() + STAT_TIMEOUT_S)):
            info = await asyncio.to_thread(os.stat, path)
    except (OSError, TimeoutError, ValueError):
        return 0
    if stat.S_ISDIR(info.st_mode):  # a model folder: its files in all (bounded, in a thread)
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + STAT_TIMEOUT_S)):
                return await asyncio.to_thread(_folder_bytes, path)
        except (OSError, TimeoutError):
            return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _folder_bytes(path: str, limit: int = 1000) -> int:
    total = seen = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            seen += 1
            if seen > limit:
                return 0
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total
