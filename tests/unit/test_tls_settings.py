"""The TLS settings' start-up checks (mesh/rpc/tls.py): incomplete or contradictory settings
fail with a message naming the settings to fix, before any server or channel is made."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mesh.rpc.tls import internal_client_tls, internal_server_tls, public_server_tls
from mesh.settings import CommonSettings, RouterSettings


def test_plaintext_is_the_default() -> None:
    assert public_server_tls(RouterSettings()) is None
    assert internal_server_tls(CommonSettings()) is None
    assert internal_client_tls(CommonSettings()) is None


def test_request_mode_is_refused_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="use none or require"):
        RouterSettings(tls_client_auth="request")
    with pytest.raises(ValidationError, match="none or require"):
        RouterSettings(tls_client_auth="sometimes")
    assert RouterSettings(tls_client_auth="REQUIRE").tls_client_auth == "require"


@pytest.mark.parametrize(("fields", "message"), [
    ({"tls_cert": "/c.pem"}, "both MESH_ROUTER_TLS_CERT and MESH_ROUTER_TLS_KEY"),
    ({"tls_client_ca": "/ca.pem"}, "need server TLS"),
    ({"tls_client_auth": "require"}, "need server TLS"),
    ({"tls_cert": "/c.pem", "tls_key": "/k.pem", "tls_client_auth": "require"}, "needs MESH_ROUTER_TLS_CLIENT_CA"),
    ({"tls_cert": "/c.pem", "tls_key": "/k.pem", "tls_client_ca": "/ca.pem"}, "MESH_ROUTER_TLS_CLIENT_AUTH=require"),
])
def test_incomplete_public_tls_names_what_is_missing(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        public_server_tls(RouterSettings(**fields))


def test_public_tls_settings_map_to_the_server_side() -> None:
    tls = public_server_tls(RouterSettings(tls_cert="/c.pem", tls_key="/k.pem", tls_client_ca="/ca.pem",
                                           tls_client_auth="require"))
    assert tls is not None and tls.require_client_cert and tls.client_ca == "/ca.pem"
    tls = public_server_tls(RouterSettings(tls_cert="/c.pem", tls_key="/k.pem"))
    assert tls is not None and not tls.require_client_cert and tls.files() == ("/c.pem", "/k.pem")


def test_internal_tls_needs_all_three_files() -> None:
    with pytest.raises(ValueError, match="missing: MESH_INTERNAL_TLS_KEY"):
        internal_server_tls(CommonSettings(internal_tls_ca="/ca.pem", internal_tls_cert="/c.pem"))
    common = CommonSettings(internal_tls_ca="/ca.pem", internal_tls_cert="/c.pem", internal_tls_key="/k.pem",
                            internal_tls_server_name="meshserve-internal")
    server, client = internal_server_tls(common), internal_client_tls(common)
    assert server is not None and server.require_client_cert and server.client_ca == "/ca.pem"
    assert client is not None and client.options() == [("grpc.ssl_target_name_override", "meshserve-internal")]
