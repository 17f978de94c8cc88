"""router/envoy_config.py: which models Envoy may send straight to a pod, the endpoints file,
and the parts of the bootstrap the router's promises rest on. Envoy itself validates the
bootstrap when its binary is here (`envoy --mode validate`)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess

import pytest

from mesh.rpc.tls import ClientTLS, ServerTLS
from router import envoy
from router import envoy_config as ec

ROUTER = ec.Addr("127.0.0.1", 9000)


@dataclasses.dataclass
class Spec:
    tenant: str = ""


def _held(versions: dict[str, int]):  # noqa: ANN202
    return lambda base: {v: base for v in range(1, versions.get(base, 1) + 1)}


def test_only_what_python_would_forward_unchanged_is_direct() -> None:
    models = {"a": Spec(), "b": Spec(), "acme:c": Spec("acme"), "old": Spec("acme"), "v": Spec(), "v@2": Spec()}
    ready = ["a", "b", "acme:c", "old", "v", "v@2", "gone"]
    direct = ec.direct_ids(ready, models, _held({"v": 2}), quota_free=True)
    # a tenant's models (namespaced or from before namespacing), versioned ones, unregistered ones: Python
    assert direct == {"a", "b"}
    assert ec.direct_ids(ready, models, _held({}), quota_free=False) == set()  # a quota: Python counts


def _groups(doc: dict) -> list[dict]:
    return doc["resources"][0]["endpoints"]


def test_endpoints_list_each_pods_ready_models_and_python_last() -> None:
    copies = {"a": ["10.0.0.1:8085", "10.0.0.2:8085"], "b": ["10.0.0.2:8085"], "t:c": ["10.0.0.1:8085"]}
    doc = ec.endpoints(copies, ROUTER, {"a", "b"})
    pods, python = _groups(doc)
    assert pods["priority"] == 0 and python["priority"] == 1
    listed = {e["endpoint"]["address"]["socket_address"]["address"]:
              e["metadata"]["filter_metadata"]["envoy.lb"]["models"] for e in pods["lb_endpoints"]}
    assert listed == {"10.0.0.1": ["a"], "10.0.0.2": ["a", "b"]}  # t:c is not direct
    meta = python["lb_endpoints"][0]["metadata"]["filter_metadata"]["envoy.lb"]
    assert meta == {"role": "router", "models": ["a", "b"]}  # the fallback for a copy that fails
    assert python["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == 9000


def test_with_no_pod_listed_python_is_priority_0() -> None:
    (only,) = _groups(ec.endpoints({}, ROUTER, set()))
    assert only["priority"] == 0  # priorities must start at 0


def test_pod_host_names_are_resolved_and_unresolvable_ones_left_to_python() -> None:
    copies = {"a": ["pod-0.mesh:8085", "pod-1.mesh:8085"]}
    doc = ec.endpoints(copies, ROUTER, {"a"}, lambda host: "10.1.1.1" if host == "pod-0.mesh" else None)
    pods, _ = _groups(doc)
    assert [e["endpoint"]["address"]["socket_address"] for e in pods["lb_endpoints"]] == [
        {"address": "10.1.1.1", "port_value": 8085}]


def test_ipv6_addresses() -> None:
    addr = ec.Addr.parse("[::1]:8033")
    assert addr == ec.Addr("::1", 8033) and str(addr) == "[::1]:8033"


def _route(doc: dict, path: str) -> dict:
    routes = doc["resources"][0]["virtual_hosts"][0]["routes"]
    return next(r for r in routes if r["match"].get("path") == path or r["match"].get("prefix") == path)


def test_routes_list_who_may_take_the_direct_path() -> None:
    meta = _route(ec.routes(["ab" * 32], anonymous=False), ec.INFER_PATH)["metadata"]["filter_metadata"]
    assert meta[ec.LUA_FILTER] == {"anonymous": False, "t" + "ab" * 32: True}
    meta = _route(ec.routes([], anonymous=True), ec.INFER_PATH)["metadata"]["filter_metadata"]
    assert meta[ec.LUA_FILTER] == {"anonymous": True}


def test_bootstrap_keeps_the_routers_promises() -> None:
    boot = ec.bootstrap(ec.Addr("0.0.0.0", 8033), ROUTER, "/cfg", 16 << 20, 256)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["rds"]["config_source"]["path_config_source"]["path"] == "/cfg/rds.json"
    doc = ec.routes([], anonymous=True)
    infer, rest = _route(doc, ec.INFER_PATH), _route(doc, "/")
    for route in (infer, rest):
        # no Envoy timeout of its own: the caller's grpc-timeout, uncapped, is the deadline
        assert route["route"]["timeout"] == "0s"
        assert route["route"]["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
    assert infer["route"]["cluster"] == ec.MESH_CLUSTER and rest["route"]["cluster"] == ec.ROUTER_CLUSTER
    retry = infer["route"]["retry_policy"]
    assert "unavailable" in retry["retry_on"] and "connect-failure" in retry["retry_on"]
    assert retry["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"  # i.e. Python
    mesh = next(c for c in boot["static_resources"]["clusters"] if c["name"] == ec.MESH_CLUSTER)
    subset = mesh["lb_subset_config"]
    assert subset["fallback_policy"] == "DEFAULT_SUBSET" and subset["default_subset"] == {"role": "router"}
    assert subset["list_as_any"] and mesh["lb_policy"] == "LEAST_REQUEST"
    assert mesh["eds_cluster_config"]["eds_config"]["path_config_source"]["path"] == "/cfg/eds.json"
    listener = boot["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] > 16 << 20  # a whole request fits
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_the_per_pod_cap_holds_in_envoy_and_its_shed_is_resource_exhausted() -> None:
    """MESH_ROUTER_MAX_IN_FLIGHT_PER_POD through Envoy: one connection per endpoint of `mesh`
    at that many streams, that many waiting in all, and the overflow answered as Python
    answers it (RESOURCE_EXHAUSTED + grpc-retry-pushback-ms, the setting named), not UNAVAILABLE."""
    boot = ec.bootstrap(ec.Addr("0.0.0.0", 8033), ROUTER, "/cfg", 16 << 20, 7)
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    mesh = clusters[ec.MESH_CLUSTER]
    assert mesh["circuit_breakers"]["per_host_thresholds"] == [{"priority": "DEFAULT", "max_connections": 1}]
    assert mesh["circuit_breakers"]["thresholds"][0]["max_pending_requests"] == 7
    options = mesh["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] == 7
    router = clusters[ec.ROUTER_CLUSTER]  # the Python router's own RPCs: its own limits apply
    assert "per_host_thresholds" not in router["circuit_breakers"]
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (mapper,) = hcm["local_reply_config"]["mappers"]
    assert mapper["filter"] == {"response_flag_filter": {"flags": ["UO"]}}
    added = {h["header"]["key"]: h["header"]["value"] for h in mapper["headers_to_add"]}
    assert added == {"grpc-status": "8", "grpc-retry-pushback-ms": "10"}
    message = mapper["body_format_override"]["text_format_source"]["inline_string"]
    assert "MESH_ROUTER_MAX_IN_FLIGHT_PER_POD" in message and "7 requests" in message


@pytest.mark.skipif(envoy.find_binary("") is None, reason="no Envoy binary")
def test_envoy_accepts_the_tls_bootstrap(tmp_path: pathlib.Path) -> None:
    from tests.pki import CA

    ca = CA.create(tmp_path / "ca")
    leaf = ca.issue("router", "DNS:meshserve-internal")
    public = ec.PublicTLS(str(leaf.cert), str(leaf.key), str(ca.cert))
    pods = ec.PodTLS(str(ca.cert), str(leaf.cert), str(leaf.key), "meshserve-internal")
    boot = ec.bootstrap(ec.Addr("127.0.0.1", 0), ROUTER, str(tmp_path), 16 << 20, 256, public, pods)
    for name, doc in ec.secrets(public, pods).items():
        (tmp_path / name).write_text(json.dumps(doc))
    (tmp_path / ec.EDS_FILE).write_text(json.dumps(ec.endpoints({"a": ["127.0.0.1:1"]}, ROUTER, {"a"}, pod_tls=True)))
    (tmp_path / ec.RDS_FILE).write_text(json.dumps(ec.routes([], anonymous=False)))
    (tmp_path / "bootstrap.json").write_text(json.dumps(boot))
    binary = envoy.find_binary("")
    assert binary is not None
    done = subprocess.run([binary, "--mode", "validate", "-c", str(tmp_path / "bootstrap.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.skipif(envoy.find_binary("") is None, reason="no Envoy binary")
def test_envoy_accepts_the_bootstrap_and_the_endpoints(tmp_path: pathlib.Path) -> None:
    boot = ec.bootstrap(ec.Addr("127.0.0.1", 0), ROUTER, str(tmp_path), 16 << 20, 256)
    (tmp_path / "bootstrap.json").write_text(json.dumps(boot))
    (tmp_path / ec.EDS_FILE).write_text(json.dumps(ec.endpoints({"a": ["127.0.0.1:1"]}, ROUTER, {"a"})))
    (tmp_path / ec.RDS_FILE).write_text(json.dumps(ec.routes(["ab" * 32], anonymous=False)))
    binary = envoy.find_binary("")
    assert binary is not None
    done = subprocess.run([binary, "--mode", "validate", "-c", str(tmp_path / "bootstrap.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _settings(**kw: object):  # noqa: ANN202
    from mesh.settings import RouterSettings

    return RouterSettings(**kw)  # type: ignore[arg-type]


def test_when_envoy_runs() -> None:
    assert envoy.wanted(_settings(envoy="off", allow_anonymous=True), None, None)[0] is None
    binary = envoy.find_binary("")
    if binary is not None:
        assert envoy.wanted(_settings(), None, None)[0] == binary  # tokens or not
        assert envoy.wanted(_settings(envoy="on"), None, None)[0] == binary
        # TLS on the public port (client certificates too) and named TLS to the pods are Envoy's
        public = ServerTLS("/t/c.pem", "/t/k.pem", "/t/ca.pem", require_client_cert=True)
        named = ClientTLS("/i/ca.pem", "/i/c.pem", "/i/k.pem", "meshserve-internal")
        assert envoy.wanted(_settings(), public, named)[0] == binary
    # auto stays off where it cannot help or cannot run, and says why
    unnamed = ClientTLS("/i/ca.pem", "/i/c.pem", "/i/k.pem")
    off, why = envoy.wanted(_settings(allow_anonymous=True), None, unnamed)
    assert off is None and "MESH_INTERNAL_TLS_SERVER_NAME" in why
    off, why = envoy.wanted(_settings(envoy_bin="/nonexistent/envoy"), None, None)
    assert off is None and "binary" in why
    with pytest.raises(ValueError, match="cannot run"):
        envoy.wanted(_settings(envoy="on", envoy_bin="/nonexistent/envoy"), None, None)
    with pytest.raises(ValueError, match="CONFIG_DIR"):
        envoy.wanted(_settings(envoy="external"), None, None)
    with pytest.raises(ValueError, match="SERVER_NAME"):
        envoy.wanted(_settings(envoy="external", envoy_config_dir="/cfg"), None, unnamed)
    assert envoy.wanted(_settings(envoy="external", envoy_config_dir="/cfg"), None, None)[0] == envoy.EXTERNAL


def _tls_boot(config_dir: str) -> tuple[dict, dict]:
    public = ec.PublicTLS("/tls/router.pem", "/tls/router.key", "/ca/clients.pem")
    pods = ec.PodTLS("/int/ca.pem", "/int/router.pem", "/int/router.key", "meshserve-internal")
    return (ec.bootstrap(ec.Addr("127.0.0.1", 0), ROUTER, config_dir, 16 << 20, 256, public, pods),
            ec.secrets(public, pods))


def test_tls_public_port_client_certificates_and_pods() -> None:
    boot, files = _tls_boot("/cfg")
    chain = boot["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
    hcm = chain["filters"][0]["typed_config"]
    # the verified certificate reaches Python in XFCC, which only Envoy sets
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["set_current_client_cert_details"] == {"subject": True, "uri": True}
    mesh = next(c for c in boot["static_resources"]["clusters"] if c["name"] == ec.MESH_CLUSTER)
    (match,) = mesh["transport_socket_matches"]
    upstream = match["transport_socket"]["typed_config"]
    assert match["match"] == ec.POD_SOCKET and upstream["sni"] == "meshserve-internal"
    assert upstream["common_tls_context"]["combined_validation_context"]["default_validation_context"] == {
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "meshserve-internal"}}]}
    assert "transport_socket" not in mesh  # the Python router's endpoint: plaintext on loopback
    # the files are SDS secrets with their folders watched (a rotated Secret is picked up)
    assert set(files) == {"sds-public-cert.json", "sds-public-client-ca.json", "sds-internal-cert.json",
                          "sds-internal-ca.json"}
    cert = files["sds-public-cert.json"]["resources"][0]["tls_certificate"]
    assert cert["certificate_chain"] == {"filename": "/tls/router.pem"} and cert["watched_directory"] == {"path": "/tls"}
    eds = ec.endpoints({"a": ["127.0.0.1:1"]}, ROUTER, {"a"}, pod_tls=True)
    pod, router = (g["lb_endpoints"][0]["metadata"]["filter_metadata"] for g in eds["resources"][0]["endpoints"])
    assert pod[ec.SOCKET_MATCH] == ec.POD_SOCKET and ec.SOCKET_MATCH not in router
    # without client certificates a client's XFCC is dropped and none is set
    plain = ec.bootstrap(ec.Addr("127.0.0.1", 0), ROUTER, "/cfg", 16 << 20, 256, ec.PublicTLS("/c", "/k"))
    hcm = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["forward_client_cert_details"] == "SANITIZE" and "set_current_client_cert_details" not in hcm


def test_forwarded_client_certificates_are_parsed_and_trusted_only_behind_envoy() -> None:
    from types import SimpleNamespace

    from router import auth

    value = ('Hash=ab;Subject="CN=acme-client,O=Acme\\, Inc";URI=spiffe://x;URI=meshserve://tenant/acme,'
             'Hash=cd;Subject="CN=admin"')  # a second element (a proxy before Envoy) is not ours
    fields = auth.parse_xfcc(value)
    assert fields["URI"] == ["spiffe://x", "meshserve://tenant/acme"]
    assert auth.common_name(fields["Subject"][0]) == "acme-client"
    authn = auth.Authenticator(tokens={}, certificates=True, synced=lambda: True)
    context = SimpleNamespace(invocation_metadata=lambda: ((auth.XFCC_KEY, value),), auth_context=lambda: {})
    with pytest.raises(Exception, match="credential|token"):  # not behind Envoy: XFCC is no credential
        authn.resolve(context)
    authn.trust_digest = True
    principal = authn.resolve(context)
    assert (principal.tenant, principal.via, principal.admin) == ("acme", "certificate", False)


def test_the_token_digest_envoy_passes_on_is_trusted_only_behind_envoy() -> None:
    from types import SimpleNamespace

    from mesh.credentials import digest
    from mesh.errors import Unauthenticated
    from mesh.types import TokenRecord
    from router import auth

    tokens = {digest("secret"): TokenRecord(tenant="", scope="infer", name="u")}
    context = SimpleNamespace(invocation_metadata=lambda: ((auth.DIGEST_KEY, digest("secret")),),
                              auth_context=lambda: {})
    authn = auth.Authenticator(tokens)
    with pytest.raises(Unauthenticated):  # a caller's own header, on a router without Envoy
        authn.resolve(context)  # type: ignore[arg-type]
    authn.trust_digest = True
    assert authn.resolve(context).name == "u"  # type: ignore[arg-type]
    context = SimpleNamespace(invocation_metadata=lambda: ((auth.DIGEST_KEY, digest("other")),),
                              auth_context=lambda: {})
    with pytest.raises(Unauthenticated):
        authn.resolve(context)  # type: ignore[arg-type]
