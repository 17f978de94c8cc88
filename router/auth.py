"""Who is calling: the Principal every public RPC of the router runs as, and how it is found.

The authentication layer (tokens, client certificates, anonymous mode) resolves the caller
once per RPC, before the handler runs, and sets it with `bind`; the handlers and everything
they call read it with `current()` (a context variable: grpc.aio runs every RPC in its own
task, so a binding never leaks into another RPC).

`Guard` applies it: every method handler of the router's public services is wrapped once,
when it is registered (like mesh/rpc/status.py's instrumentation, and for the same reason: a
grpc.aio ServerInterceptor costs an extra coroutine, a handler lookup and a closure per RPC).
The wrapper reads `authorization: Bearer <token>` from the call's metadata, else a verified
client certificate from `context.auth_context()`, else admits the caller anonymously when the
router allows it; it raises Unauthenticated / PermissionDenied (mapped to their codes by the
status layer) before the handler runs. grpc health and the metrics port are other servers
and stay open.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from mesh.credentials import METADATA_KEY, digest
from mesh.errors import PermissionDenied, Unauthenticated, Unavailable
from mesh.rpc.status import WrappingGeneric
from mesh.types import TokenRecord

log = logging.getLogger(__name__)

DEFAULT_TENANT = ""  # the tenant of models registered without one, and of anonymous callers
ADMIN_SCOPE, TENANT_SCOPE, INFER_SCOPE = "admin", "tenant", "infer"
SCOPES = (INFER_SCOPE, TENANT_SCOPE, ADMIN_SCOPE)
# What an "infer" token may not do: change the registry (RELIABILITY.md S1: registration needs a
# token apart from the ones inference clients hold).
REGISTRY_WRITES = frozenset({"/mesh.v1.ModelRegistry/RegisterModel", "/mesh.v1.ModelRegistry/UnregisterModel",
                             "/mesh.v1.ModelRegistry/RegisterModels",
                             # VModels change where requests go (router/vmodel_api.py).
                             "/mesh.v1.VModels/SetVModel", "/mesh.v1.VModels/DeleteVModel",
                             "/mesh.v1.VModels/StartRollout", "/mesh.v1.VModels/AbortRollout",
                             # Triton's repository extension changes what is loaded (router/extensions.py).
                             "/inference.GRPCInferenceService/RepositoryModelLoad",
                             "/inference.GRPCInferenceService/RepositoryModelUnload"})
_BEARER = "bearer "
HOW_TO = ("pass a token as the gRPC metadata 'authorization: Bearer <token>' (mesh CLI: --token, "
          "MESH_TOKEN, or the token file `mesh up` writes; tritonclient: "
          "headers={'authorization': 'Bearer <token>'})")
NO_CREDENTIALS = f"no credentials: {HOW_TO}"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # as registrations' tenants (router/registry.py)


def valid_tenant(tenant: str) -> bool:
    """The default tenant (""), or a name registrations accept."""
    return not tenant or _TENANT.fullmatch(tenant) is not None


@dataclasses.dataclass(frozen=True)
class Principal:
    tenant: str = DEFAULT_TENANT
    admin: bool = False  # mesh-wide scope: every tenant's models, tokens and quotas
    via: str = "anonymous"  # "token", "certificate" or "anonymous"
    name: str = ""  # the token's or certificate's label, for logs (never the secret)
    infer_only: bool = False  # scope "infer": inference and reads, never a registry write


ANONYMOUS = Principal()
_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("mesh_principal")


def bind(principal: Principal) -> contextvars.Token[Principal]:
    return _CURRENT.set(principal)


def current() -> Principal:
    """The caller of the RPC being handled. Outside an authenticated RPC (unit tests of the
    handlers, in-process callers) there is none bound: LookupError, never a silent default."""
    return _CURRENT.get()


def require_admin(operation: str) -> Principal:
    """The current caller, when it has the admin scope; PermissionDenied otherwise."""
    principal = _CURRENT.get()
    if not principal.admin:
        raise PermissionDenied(f"{operation} needs an admin token (this caller has tenant scope)")
    return principal


DIGEST_KEY = "x-mesh-token-sha256"
XFCC_KEY = "x-forwarded-client-cert"  # set by Envoy alone (router/envoy_config.py), trusted as DIGEST_KEY


def parse_digests(text: str) -> tuple[str, ...]:
    """Comma-separated sha256 hex digests (MESH_ROUTER_ADMIN_TOKEN_SHA256); ValueError if one
    is not 64 hex digits (a pasted token instead of its digest, say)."""
    out = []
    for item in (s.strip().lower() for s in text.split(",")):
        if not item:
            continue
        if len(item) != 64 or any(c not in "0123456789abcdef" for c in item):
            raise ValueError("MESH_ROUTER_ADMIN_TOKEN_SHA256 takes sha256 hex digests of tokens "
                             "(64 hex digits each, comma-separated), not the tokens: see `mesh token generate`")
        out.append(item)
    return tuple(out)


class Authenticator:
    """Resolves the Principal of one call. `tokens` is the watched view's dict of token records
    by digest (MeshState.tokens: a revoked token stops working within the watch lag);
    `synced()` tells whether that view has loaded yet (an unknown token before then is
    UNAVAILABLE, retry, not UNAUTHENTICATED)."""

    def __init__(
        self,
        tokens: Mapping[str, TokenRecord],
        *,
        allow_anonymous: bool = False,
        admin_digests: Iterable[str] = (),
        cert_admins: Iterable[str] = (),
        cert_tenant_uri_prefix: str = "meshserve://tenant/",
        certificates: bool = False,
        synced: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tokens = tokens
        self.allow_anonymous = allow_anonymous
        self.admin_digests = tuple(admin_digests)
        self.cert_admins = frozenset(cert_admins)
        self.uri_prefix = cert_tenant_uri_prefix
        self.certificates = certificates  # the server requires (so verifies) client certificates
        self.synced = synced
        self.clock = clock
        # Envoy's Lua filter swaps a bearer token for DIGEST_KEY (its sha256), so the token
        # itself never reaches a pod; trusted only behind Envoy, on a loopback-only port.
        self.trust_digest = False
        self._bootstrap = Principal(DEFAULT_TENANT, True, "token", "bootstrap-admin")
        # digest -> (the record it was made from, its Principal): reused while the view holds
        # that same record object (an update or a revocation replaces or removes it).
        self._principals: dict[str, tuple[TokenRecord, Principal]] = {}

    @classmethod
    def from_settings(cls, settings: Any, tokens: Mapping[str, TokenRecord],
                      synced: Callable[[], bool]) -> Authenticator:
        admins = [s.strip() for s in settings.cert_admins.split(",") if s.strip()]
        return cls(tokens, allow_anonymous=settings.allow_anonymous,
                   admin_digests=parse_digests(settings.admin_token_sha256), cert_admins=admins,
                   cert_tenant_uri_prefix=settings.cert_tenant_uri_prefix,
                   certificates=getattr(settings, "tls_client_auth", "none") == "require", synced=synced)

    def describe(self) -> str:
        """One line for the start-up log."""
        modes = ["bearer tokens"]
        if self.admin_digests:
            modes.append(f"{len(self.admin_digests)} bootstrap admin token(s)")
        if self.certificates:
            modes.append("verified client certificates (CN or a URI SAN "
                         f"{self.uri_prefix}<tenant>; admins: {len(self.cert_admins)})")
        if self.allow_anonymous:
            modes.append("anonymous callers as the default tenant")
        return ", ".join(modes)

    def resolve(self, context: grpc.aio.ServicerContext) -> Principal:
        token = None
        hashed = forwarded = None
        for key, value in context.invocation_metadata() or ():
            if key == METADATA_KEY:
                token = _bearer(value)
                break
            if self.trust_digest and isinstance(value, str):
                if key == DIGEST_KEY:
                    hashed = value
                elif key == XFCC_KEY:
                    forwarded = value
        if token is not None:
            return self.by_token(token)
        if hashed is not None:  # Envoy in front hashed the caller's token (router/envoy_config.py)
            return self.by_digest(hashed)
        if self.certificates:
            if self.trust_digest:  # behind Envoy, which verified the certificate and says what it names
                principal = self.by_forwarded(forwarded) if forwarded is not None else None
            else:  # auth_context() builds a dict per call: only when it can matter
                principal = self.by_certificate(context.auth_context())
            if principal is not None:
                return principal
        if self.allow_anonymous:
            return ANONYMOUS
        raise Unauthenticated(NO_CREDENTIALS)

    def by_token(self, token: str) -> Principal:
        return self.by_digest(digest(token))

    def by_digest(self, d: str) -> Principal:
        """The Principal of the token whose sha256 hex is `d`."""
        record = self.tokens.get(d)
        if record is None:
            # A handful of configured digests: compared in constant time, every one of them.
            if any([hmac.compare_digest(d, known) for known in self.admin_digests]):
                return self._bootstrap
            if not self.synced():
                raise Unavailable("the router is still loading the mesh state; retry shortly")
            raise Unauthenticated(f"unknown or revoked token: {HOW_TO}")
        if record.expires_unix_ms and self.clock() * 1000 >= record.expires_unix_ms:
            raise Unauthenticated(f"token '{record.name}' has expired; ask an admin for a new one "
                                  "(`mesh token create`)")
        cached = self._principals.get(d)
        if cached is not None and cached[0] is record:
            return cached[1]
        principal = Principal(record.tenant, record.scope == ADMIN_SCOPE, "token", record.name,
                              infer_only=record.scope == INFER_SCOPE)
        if len(self._principals) > 2 * len(self.tokens) + 64:  # drop revoked tokens' entries
            self._principals = {k: v for k, v in self._principals.items() if self.tokens.get(k) is v[0]}
        self._principals[d] = (record, principal)
        return principal

    def by_certificate(self, auth: Mapping[str, Sequence[bytes]]) -> Principal | None:
        """The Principal a verified client certificate names, or None without one. gRPC Python
        asks for client certificates only when the server requires them, and then verifies
        them against the client CA in the handshake, so x509 properties here are verified."""
        if auth.get("transport_security_type") != [b"ssl"]:
            return None
        cn = auth.get("x509_common_name")
        uris = [u.decode(errors="replace") for u in auth.get("peer_uri", ())]
        return self._certificate(cn[0].decode(errors="replace") if cn else "", uris)

    def by_forwarded(self, value: str) -> Principal | None:
        """The Principal of the client certificate Envoy verified, from the
        x-forwarded-client-cert it set (router/envoy_config.py; a client's own is dropped)."""
        fields = parse_xfcc(value)
        return self._certificate(common_name(fields.get("Subject", [""])[0]), fields.get("URI", []))

    def _certificate(self, common: str, uris: Sequence[str]) -> Principal | None:
        if not common and not uris:
            return None
        # An explicit tenant URI SAN wins (`<prefix>` alone: the default tenant), else the CN.
        named = next((u[len(self.uri_prefix):] for u in uris
                      if self.uri_prefix and u.startswith(self.uri_prefix)), None)
        tenant = common if named is None else named
        admin = common in self.cert_admins or any(u in self.cert_admins for u in uris)
        if named is None and not common and not admin:
            raise Unauthenticated("the client certificate names no tenant (no CN, no tenant URI SAN)")
        if not valid_tenant(tenant):
            raise Unauthenticated("the client certificate's tenant (URI SAN or CN) is not a valid tenant "
                                  "name ([A-Za-z0-9._-], at most 63 characters)")
        return Principal(tenant, admin, "certificate", common or (uris[0] if uris else ""))


def _split(text: str, sep: str) -> list[str]:
    """`text` cut at each `sep` outside double quotes and not escaped by a backslash."""
    parts, current, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace('\\"', '"')
    return value


def parse_xfcc(value: str) -> dict[str, list[str]]:
    """The first element of an x-forwarded-client-cert header (Envoy's format: `Key=value`
    pairs cut by `;`, values with `,;=` quoted), as key -> values (URI may repeat)."""
    out: dict[str, list[str]] = {}
    first = _split(value, ",")[0]
    for pair in _split(first, ";"):
        key, eq, raw = pair.partition("=")
        if eq:
            out.setdefault(key.strip(), []).append(_unquote(raw.strip()))
    return out


def common_name(subject: str) -> str:
    """The CN of an RFC 2253 distinguished name ("CN=a,O=b"), "" without one."""
    for rdn in _split(subject, ","):
        key, _, value = rdn.partition("=")
        if key.strip().upper() == "CN":
            return value.replace("\\", "")
    return ""


def _bearer(value: str | bytes) -> str:
    if isinstance(value, str) and value.startswith("Bearer ") and len(value) > 7 and value[7] != " ":
        return value[7:].rstrip()  # the common spelling, without the general path's work
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if text[:len(_BEARER)].lower() != _BEARER or not text[len(_BEARER):].strip():
        raise Unauthenticated(f"the authorization metadata is not 'Bearer <token>': {HOW_TO}")
    return text[len(_BEARER):].strip()


# -- applying it to handlers ----------------------------------------------------------------------


class Guard:
    """Wraps method handlers so each RPC is authenticated (and, for `admin_services`, checked
    for the admin scope) before the handler runs."""

    def __init__(self, authenticator: Authenticator, admin_services: Iterable[str] = ()) -> None:
        self.authenticator = authenticator
        self.admin_services = frozenset(admin_services)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        service = method.split("/")[1] if method.count("/") >= 2 else method
        admin = service in self.admin_services
        h: Any = handler
        for kind in ("unary_unary", "stream_unary"):
            fn = getattr(h, kind)
            if fn:
                return h._replace(**{kind: _unary(fn, self.authenticator.resolve, admin, method)})
        for kind in ("unary_stream", "stream_stream"):
            fn = getattr(h, kind)
            if fn:
                return h._replace(**{kind: _stream(fn, self.authenticator.resolve, admin, method)})
        return handler

    def generic(self, inner: grpc.GenericRpcHandler) -> grpc.GenericRpcHandler:
        return WrappingGeneric(inner, self.wrap)

    def server(self, server: Any) -> _GuardedServer:
        """A stand-in for `server` for generated `add_*Servicer_to_server` functions: the
        handlers they add are wrapped first."""
        return _GuardedServer(server, self)


def _admitted(resolve: Callable[[Any], Principal], context: Any, admin: bool, method: str) -> None:
    principal = resolve(context)
    if admin and not principal.admin:
        raise PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs an admin token "
                               "(this caller has tenant scope)")
    if principal.infer_only and method in REGISTRY_WRITES:
        raise PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs a tenant or admin token "
                               "(this token has the infer scope: inference and reads only)")
    _CURRENT.set(principal)


def _unary(fn: Callable[..., Any], resolve: Callable[[Any], Principal], admin: bool,
           method: str) -> Callable[..., Any]:
    async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _admitted(resolve, context, admin, method)
        return await fn(request, context)

    return authenticated


def _stream(fn: Callable[..., Any], resolve: Callable[[Any], Principal], admin: bool,
            method: str) -> Callable[..., Any]:
    async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _admitted(resolve, context, admin, method)
        async for item in fn(request, context):
            yield item

    return authenticated


class _GuardedServer:
    def __init__(self, server: Any, guard: Guard) -> None:
        self._server = server
        self._guard = guard

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([self._guard.generic(h) for h in handlers])

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._guard.wrap(h, f"/{service}/{name}") for name, h in handlers.items()})
