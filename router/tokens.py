"""API tokens: minting, and the `mesh.v1.TokenAdmin` service (create, list, revoke; admin only).

A token is `msh_` + 32 random bytes (mesh/credentials.py): only its sha256 is stored, as the
key tokens/<sha256> holding a TokenRecord (tenant, scope, name, created, expiry), so a leak of
etcd or of a backup gives no usable credential. Routers see tokens through their watched view
(MeshState.tokens), so a new token works and a revoked one stops working on every router
within the watch lag; this router answers only once its own view shows the change. A tenant
may hold several tokens at once (rotation: create the new one, move clients, revoke the old).
Every create and revoke is logged (who, which name, tenant and scope; never the secret).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import grpc

from mesh import types
from mesh.clock import Clock
from mesh.credentials import PREFIX, new_token
from mesh.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, Unavailable, quote_id
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.pb.v1 import tokens_pb2, tokens_pb2_grpc
from mesh.state import MeshState
from mesh.types import TokenRecord
from router import auth

log = logging.getLogger(__name__)

SERVICE = "mesh.v1.TokenAdmin"
ID_DIGITS = 12  # of the sha256 shown as a token's id
MIN_PREFIX = 6
MAX_TTL_S = 10 * 365 * 86400
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX = re.compile(r"[0-9a-f]+")
WAIT_S = 10.0  # longest a call waits for this router's view to show its own write


def check_tenant(tenant: str) -> str:
    if not auth.valid_tenant(tenant):
        raise InvalidArgument("a tenant is 1-63 characters of [A-Za-z0-9._-], starting with a letter or digit")
    return tenant


def info(digest: str, record: TokenRecord, now_ms: int, configured: bool = False) -> tokens_pb2.TokenInfo:
    return tokens_pb2.TokenInfo(
        name=record.name, tenant=record.tenant, scope=record.scope, id=digest[:ID_DIGITS],
        created_unix_ms=record.created_unix_ms, expires_unix_ms=record.expires_unix_ms,
        expired=bool(record.expires_unix_ms) and now_ms >= record.expires_unix_ms, configured=configured)


class TokenAdminServicer(tokens_pb2_grpc.TokenAdminServicer):
    """Every method runs behind auth.Guard with the admin scope required for this service."""

    def __init__(self, client: EtcdClient, keys: Keys, state: MeshState, clock: Clock,
                 admin_digests: tuple[str, ...] = (),
                 revoked: Callable[[], Awaitable[None]] | None = None) -> None:
        """`revoked()`: awaited once this router's view no longer has a revoked token (Envoy in
        front applying it too, router/envoy.py DataPlane.sync), before RevokeToken answers."""
        self.client = client
        self.keys = keys
        self.state = state
        self.clock = clock
        self.admin_digests = admin_digests
        self.revoked = revoked

    async def CreateToken(self, request: tokens_pb2.CreateTokenRequest,
                          context: grpc.aio.ServicerContext) -> tokens_pb2.CreateTokenResponse:
        by = auth.current()
        scope = request.scope or auth.TENANT_SCOPE
        if scope not in auth.SCOPES:
            raise InvalidArgument("scope is 'infer' (inference and reads), 'tenant' (also registers "
                                  "and unregisters the tenant's models) or 'admin'")
        tenant = check_tenant(request.tenant)
        if request.ttl_s > MAX_TTL_S:
            raise InvalidArgument(f"ttl_s is limited to {MAX_TTL_S} (10 years); 0 never expires")
        token = new_token()
        digest = auth.digest(token)
        name = request.name or f"{tenant or scope}-{digest[:8]}"
        if not _NAME.fullmatch(name):
            raise InvalidArgument("a token name is 1-64 characters of [A-Za-z0-9._-], starting with a letter or digit")
        if any(r.name == name for r in self.state.tokens.values()):
            raise AlreadyExists(f"a token named '{name}' exists; pick another name (or revoke it first)")
        now = self.clock.unix_ms()
        record = TokenRecord(tenant=tenant, scope=scope, name=name, created_unix_ms=now,
                             expires_unix_ms=now + request.ttl_s * 1000 if request.ttl_s else 0)
        try:
            await self.client.create(self.keys.token(digest), types.encode(record))
        except Conflict:  # 256 random bits colliding: never; but never overwrite either
            raise Unavailable("token collision; retry CreateToken") from None
        except Unavailable as exc:
            raise Unavailable(f"etcd did not confirm the new token ({exc.message}); retry CreateToken "
                              "(a token that was written anyway shows in ListTokens and can be revoked)") from None
        await self._until(lambda: digest in self.state.tokens, f"token '{name}' is created, but this router "
                          "does not show it yet; it will work within seconds")
        log.info("token created: name=%s tenant=%r scope=%s expires_unix_ms=%d by %s '%s'",
                 name, tenant, scope, record.expires_unix_ms, by.via, by.name)
        return tokens_pb2.CreateTokenResponse(token=token, info=info(digest, record, now))

    async def ListTokens(self, request: tokens_pb2.ListTokensRequest,
                         context: grpc.aio.ServicerContext) -> tokens_pb2.ListTokensResponse:
        now = self.clock.unix_ms()
        rows = [info(d, r, now) for d, r in self.state.tokens.items()
                if not request.tenant or r.tenant == request.tenant]
        if not request.tenant:
            rows += [info(d, TokenRecord(tenant="", scope=auth.ADMIN_SCOPE, name="bootstrap-admin"), now, True)
                     for d in self.admin_digests]
        rows.sort(key=lambda t: (t.tenant, t.name, t.id))
        return tokens_pb2.ListTokensResponse(tokens=rows)

    async def RevokeToken(self, request: tokens_pb2.RevokeTokenRequest,
                          context: grpc.aio.ServicerContext) -> tokens_pb2.RevokeTokenResponse:
        by = auth.current()
        digests = self._matching(request.token.strip())
        now = self.clock.unix_ms()
        revoked = []
        for d in digests:
            record = self.state.tokens.get(d)
            try:
                await self.client.delete(self.keys.token(d))
            except Unavailable as exc:
                raise Unavailable(f"etcd did not confirm the revocation ({exc.message}); retry RevokeToken "
                                  "(that is safe)") from None
            if record is not None:
                revoked.append(info(d, record, now))
                log.info("token revoked: name=%s tenant=%r scope=%s by %s '%s'",
                         record.name, record.tenant, record.scope, by.via, by.name)
        await self._until(lambda: not any(d in self.state.tokens for d in digests),
                          "the token is revoked, but this router still shows it; it stops working within seconds")
        if self.revoked is not None:
            await self.revoked()
        return tokens_pb2.RevokeTokenResponse(revoked=revoked)

    def _matching(self, text: str) -> list[str]:
        """The digests `text` names: a token itself, a name, or an id prefix."""
        if not text:
            raise InvalidArgument("name the token to revoke: its name, id (from `mesh token list`) or the token")
        tokens = self.state.tokens
        candidates = [auth.digest(text)] if text.startswith(PREFIX) else []
        candidates = [d for d in candidates if d in tokens]
        if not candidates:
            candidates = [d for d, r in tokens.items() if r.name == text]
        if not candidates and len(text) >= MIN_PREFIX and _HEX.fullmatch(text):
            candidates = [d for d in tokens if d.startswith(text)]
            if len(candidates) > 1:
                raise InvalidArgument(f"id prefix {quote_id(text)} matches {len(candidates)} tokens; give more digits")
        if not candidates:
            configured = (auth.digest(text) in self.admin_digests
                          or (len(text) >= MIN_PREFIX and any(d.startswith(text) for d in self.admin_digests))
                          or text == "bootstrap-admin")
            if configured:
                raise InvalidArgument("that is a bootstrap admin token from the router's settings "
                                      "(MESH_ROUTER_ADMIN_TOKEN_SHA256): remove it there")
            raise NotFound("no token has that name or id; `mesh token list` shows them")
        return candidates

    async def _until(self, done: Callable[[], bool], not_yet: str) -> None:
        """Read your writes: returns once this router's view shows the change."""
        if done():
            return
        try:
            await self.state.wait_for(done, WAIT_S)
        except TimeoutError:
            raise Unavailable(not_yet) from None
