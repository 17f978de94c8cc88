"""Resolving the caller of an RPC (router/auth.py): tokens, bootstrap digests, client
certificates, anonymous mode, and the handler wrapping that binds the Principal first."""

from __future__ import annotations

import asyncio
import os
import pathlib
import stat

import grpc
import pytest

from mesh import credentials
from mesh.cli.main import _duration
from mesh.errors import PermissionDenied, Unauthenticated, Unavailable
from mesh.types import TokenRecord
from router import auth

TOKEN, OTHER = credentials.new_token(), credentials.new_token()
NOW_S = 1_700_000_000.0


class Context:
    """The two things the authenticator reads from a grpc.aio ServicerContext."""

    def __init__(self, metadata: tuple = (), auth_context: dict | None = None) -> None:
        self.metadata = metadata
        self.auth = auth_context or {}
        self.auth_calls = 0

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def auth_context(self) -> dict:
        self.auth_calls += 1
        return self.auth


def bearer(token: str) -> tuple:
    return credentials.metadata(token)


def authn(tokens: dict | None = None, **kwargs: object) -> auth.Authenticator:
    return auth.Authenticator(tokens if tokens is not None else {}, clock=lambda: NOW_S, **kwargs)  # type: ignore[arg-type]


def test_token_resolves_to_its_tenant_and_scope() -> None:
    tokens = {credentials.digest(TOKEN): TokenRecord(tenant="a", name="ci"),
              credentials.digest(OTHER): TokenRecord(tenant="", scope="admin", name="ops")}
    a = authn(tokens)
    assert a.resolve(Context(bearer(TOKEN))) == auth.Principal("a", False, "token", "ci")
    assert a.resolve(Context(bearer(OTHER))) == auth.Principal("", True, "token", "ops")
    # The scheme is case-insensitive (RFC 6750), the token is not.
    assert a.resolve(Context((("authorization", f"bearer {TOKEN}"),))).tenant == "a"
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        a.resolve(Context(bearer(TOKEN.upper())))


def test_no_credentials_says_how_to_pass_a_token() -> None:
    with pytest.raises(Unauthenticated, match="authorization: Bearer <token>"):
        authn().resolve(Context())
    with pytest.raises(Unauthenticated, match="not 'Bearer <token>'"):
        authn().resolve(Context((("authorization", f"Basic {TOKEN}"),)))
    with pytest.raises(Unauthenticated, match="not 'Bearer <token>'"):
        authn().resolve(Context((("authorization", "Bearer   "),)))


def test_expired_token_is_refused_and_one_not_yet_expired_works() -> None:
    d = credentials.digest(TOKEN)
    live = authn({d: TokenRecord(tenant="a", name="t", expires_unix_ms=int(NOW_S * 1000) + 1)})
    assert live.resolve(Context(bearer(TOKEN))).tenant == "a"
    dead = authn({d: TokenRecord(tenant="a", name="t", expires_unix_ms=int(NOW_S * 1000))})
    with pytest.raises(Unauthenticated, match="'t' has expired"):
        dead.resolve(Context(bearer(TOKEN)))


def test_revocation_is_seen_through_the_live_token_table() -> None:
    """The authenticator keeps the view's dict, not a copy: a deleted key stops the token."""
    tokens = {credentials.digest(TOKEN): TokenRecord(tenant="a")}
    a = authn(tokens)
    assert a.resolve(Context(bearer(TOKEN))).tenant == "a"
    del tokens[credentials.digest(TOKEN)]
    with pytest.raises(Unauthenticated):
        a.resolve(Context(bearer(TOKEN)))


def test_unknown_token_before_the_view_loaded_is_retryable() -> None:
    with pytest.raises(Unavailable, match="still loading"):
        authn(synced=lambda: False).resolve(Context(bearer(TOKEN)))


def test_bootstrap_admin_digest_from_settings() -> None:
    a = authn(admin_digests=auth.parse_digests(f" {credentials.digest(TOKEN).upper()} ,"))
    principal = a.resolve(Context(bearer(TOKEN)))
    assert principal.admin and principal.name == "bootstrap-admin"
    with pytest.raises(Unauthenticated):
        a.resolve(Context(bearer(OTHER)))
    with pytest.raises(ValueError, match="not the tokens"):
        auth.parse_digests(TOKEN)


def test_anonymous_mode_admits_no_credentials_but_never_a_bad_token() -> None:
    a = authn(allow_anonymous=True)
    assert a.resolve(Context()) == auth.ANONYMOUS
    assert auth.ANONYMOUS.tenant == auth.DEFAULT_TENANT and not auth.ANONYMOUS.admin
    with pytest.raises(Unauthenticated):
        a.resolve(Context(bearer(TOKEN)))


def _cert(cn: str = "", uris: tuple[str, ...] = ()) -> dict:
    out: dict = {"transport_security_type": [b"ssl"], "x509_pem_cert": [b"pem"]}
    if cn:
        out["x509_common_name"] = [cn.encode()]
    if uris:
        out["peer_uri"] = [u.encode() for u in uris]
    return out


def test_client_certificate_names_the_tenant_by_uri_san_then_cn() -> None:
    a = authn(certificates=True, cert_admins=["ops", "meshserve://admin/root"])
    by_uri = a.resolve(Context(auth_context=_cert("alice", ("meshserve://tenant/t1",))))
    assert by_uri == auth.Principal("t1", False, "certificate", "alice")
    assert a.resolve(Context(auth_context=_cert("bob"))).tenant == "bob"
    assert a.resolve(Context(auth_context=_cert("ops"))).admin
    assert a.resolve(Context(auth_context=_cert("", ("meshserve://admin/root",)))).admin
    # A CN that is no tenant name (':' would forge the tenant:id internal ids) is refused.
    with pytest.raises(Unauthenticated, match="not a valid tenant"):
        a.resolve(Context(auth_context=_cert("evil:tenant")))
    # A token, when sent, is what counts (a bad one is refused even with a good certificate).
    with pytest.raises(Unauthenticated):
        a.resolve(Context(bearer(TOKEN), _cert("alice")))


def test_certificates_are_not_read_unless_the_server_requires_them() -> None:
    """Without required client certificates nothing in auth_context is trusted (and the
    per-call dict is not even built)."""
    ctx = Context(auth_context=_cert("alice"))
    with pytest.raises(Unauthenticated):
        authn().resolve(ctx)
    assert ctx.auth_calls == 0
    plaintext = {"x509_common_name": [b"alice"]}  # no transport security: never a certificate
    with pytest.raises(Unauthenticated):
        authn(certificates=True).resolve(Context(auth_context=plaintext))


# -- the handler wrapping ------------------------------------------------------------------------


def _guard(**kwargs: object) -> auth.Guard:
    tokens = {credentials.digest(TOKEN): TokenRecord(tenant="a", name="ci"),
              credentials.digest(OTHER): TokenRecord(tenant="", scope="admin", name="ops")}
    return auth.Guard(authn(tokens), **kwargs)  # type: ignore[arg-type]


async def test_unary_handler_runs_with_the_principal_bound() -> None:
    seen = []

    async def handler(request: bytes, context: object) -> bytes:
        seen.append(auth.current())
        return request

    wrapped = _guard().wrap(grpc.unary_unary_rpc_method_handler(handler), "/inference.GRPCInferenceService/ModelInfer")
    assert await wrapped.unary_unary(b"x", Context(bearer(TOKEN))) == b"x"
    assert seen == [auth.Principal("a", False, "token", "ci")]
    with pytest.raises(Unauthenticated):
        await wrapped.unary_unary(b"x", Context())
    assert len(seen) == 1  # the handler never ran


async def test_stream_handler_authenticates_before_its_first_message() -> None:
    async def handler(requests: object, context: object):  # type: ignore[no-untyped-def]
        yield auth.current().tenant

    wrapped = _guard().wrap(grpc.stream_stream_rpc_method_handler(handler),
                            "/inference.GRPCInferenceService/ModelStreamInfer")
    assert [x async for x in wrapped.stream_stream(None, Context(bearer(TOKEN)))] == ["a"]
    with pytest.raises(Unauthenticated):
        [x async for x in wrapped.stream_stream(None, Context())]


async def test_admin_service_refuses_tenant_scope() -> None:
    async def handler(request: bytes, context: object) -> bytes:
        return b"ok"

    guard = _guard(admin_services=["mesh.v1.TokenAdmin"])
    h = guard.wrap(grpc.unary_unary_rpc_method_handler(handler), "/mesh.v1.TokenAdmin/ListTokens")
    with pytest.raises(PermissionDenied, match="ListTokens needs an admin token"):
        await h.unary_unary(b"", Context(bearer(TOKEN)))
    assert await h.unary_unary(b"", Context(bearer(OTHER))) == b"ok"


async def test_bindings_do_not_leak_between_concurrent_rpcs() -> None:
    """Each RPC is its own task: a principal bound in one is never current in another."""
    seen: dict[str, str] = {}

    async def handler(request: str, context: object) -> str:
        await asyncio.sleep(0.01)
        seen[request] = auth.current().tenant
        return request

    h = _guard().wrap(grpc.unary_unary_rpc_method_handler(handler), "/x.Y/Z")
    await asyncio.gather(asyncio.create_task(h.unary_unary("tenant", Context(bearer(TOKEN)))),
                         asyncio.create_task(h.unary_unary("admin", Context(bearer(OTHER)))))
    assert seen == {"tenant": "a", "admin": ""}
    with pytest.raises(LookupError):
        auth.current()


def test_require_admin() -> None:
    async def run(principal: auth.Principal) -> auth.Principal:
        auth.bind(principal)
        return auth.require_admin("SetTenantQuota")

    assert asyncio.run(run(auth.Principal(admin=True))).admin
    with pytest.raises(PermissionDenied, match="SetTenantQuota needs an admin token"):
        asyncio.run(run(auth.Principal("a")))


# -- the client side ---------------------------------------------------------------------------


def test_token_file_is_private_and_reused(tmp_path: pathlib.Path) -> None:
    token = credentials.state_token(tmp_path / "state")
    path = tmp_path / "state" / "token"
    assert token.startswith("msh_") and len(token) > 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert credentials.state_token(tmp_path / "state") == token


def test_cli_token_precedence(tmp_path: pathlib.Path) -> None:
    file = tmp_path / "t"
    credentials.write_token_file(file, "from-file")
    env = {"MESH_TOKEN_FILE": str(file)}
    assert credentials.client_token("flag", {**env, "MESH_TOKEN": "env"}) == "flag"
    assert credentials.client_token("", {**env, "MESH_TOKEN": "env"}) == "env"
    assert credentials.client_token("", env) == "from-file"
    assert credentials.client_token("", {"MESH_TOKEN_FILE": str(tmp_path / "none")}) == ""


def test_durations() -> None:
    assert [_duration(x) for x in ("3600", "90s", "90m", "12h", "30d", "2w")] == [
        3600, 90, 5400, 43200, 30 * 86400, 14 * 86400]
    for bad in ("", "0d", "-1h", "3y", "1.5h", "d"):
        with pytest.raises(Exception, match="duration"):
            _duration(bad)
