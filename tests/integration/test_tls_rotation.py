"""mesh/rpc/tls.py against real grpc servers in this process, with certificates the test makes:
rotated server certificates picked up without a restart, rotated client certificates picked up
by ChannelPool, the internal server-name check, the verified peer certificate handlers read,
the plaintext health port, and start-up checks of the files."""

from __future__ import annotations

import os
import pathlib
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.metrics import Metrics
from mesh.rpc import server as rpc_server
from mesh.rpc.server import ChannelPool, make_server
from mesh.rpc.tls import ClientTLS, ServerTLS, peer_certificate
from tests.pki import CA, Leaf

pytestmark = pytest.mark.integration

WHO = "/test.Who/Am"  # answers the caller's verified certificate CN ("" without one)


class _Who(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != WHO:  # type: ignore[attr-defined]
            return None

        async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            peer = peer_certificate(context)
            return b"" if peer is None else f"{peer.common_name}|{','.join(peer.uris)}".encode()

        return grpc.unary_unary_rpc_method_handler(who)


def _copy(leaf: Leaf, folder: pathlib.Path) -> Leaf:
    """The leaf's files at fixed paths in `folder`, replaced atomically by _install later."""
    folder.mkdir(parents=True, exist_ok=True)
    return _install(leaf, Leaf(folder / "tls.crt", folder / "tls.key"))


def _install(leaf: Leaf, at: Leaf) -> Leaf:
    for src, dst in ((leaf.key, at.key), (leaf.cert, at.cert)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # a new inode, as a Kubernetes Secret update's symlink swap gives
    return at


async def _serve(tls: ServerTLS | None, health_port: int = 0):  # noqa: ANN202
    server, port = make_server("127.0.0.1:0", 1 << 20, Metrics(service="test"), tls=tls, health_port=health_port)
    server.add_generic_rpc_handlers([_Who()])
    await server.start()
    await server.set_serving(True)
    return server, port


async def _who(channel: grpc.aio.Channel) -> str:
    return (await channel.unary_unary(WHO)(b"", timeout=5)).decode()


def _channel(port: int, ca: pathlib.Path, leaf: Leaf | None = None, name: str = "") -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), *((leaf.key.read_bytes(), leaf.cert.read_bytes()) if leaf else ()))
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options)


async def _refused(channel: grpc.aio.Channel) -> None:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _who(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_server_picks_up_a_rotated_certificate_without_restart(tmp_path: pathlib.Path) -> None:
    old_ca, new_ca = CA.create(tmp_path / "old", "old-ca"), CA.create(tmp_path / "new", "new-ca")
    files = _copy(old_ca.issue("server"), tmp_path / "mounted")
    tls = ServerTLS(str(files.cert), str(files.key))
    server, port = await _serve(tls)
    try:
        async with _channel(port, old_ca.cert) as channel:
            assert await _who(channel) == ""
        # Half a rotation: a new certificate whose key is not there yet. It cannot load, so the
        # server keeps the old pair and handshakes go on working.
        new = new_ca.issue("server")
        shutil.copyfile(new.cert, files.cert.with_suffix(".new"))
        os.replace(files.cert.with_suffix(".new"), files.cert)
        async with _channel(port, old_ca.cert) as channel:
            assert await _who(channel) == ""
        _install(new, files)
        async with _channel(port, new_ca.cert) as channel:
            assert await _who(channel) == ""  # the server now presents the new certificate
        await _refused(_channel(port, old_ca.cert))  # and no longer the old one
    finally:
        await server.stop(None)


async def test_required_client_certificate_is_what_handlers_see(tmp_path: pathlib.Path) -> None:
    ca, other = CA.create(tmp_path / "ca"), CA.create(tmp_path / "other", "other-ca")
    srv = ca.issue("server")
    tls = ServerTLS(str(srv.cert), str(srv.key), str(ca.cert), require_client_cert=True)
    server, port = await _serve(tls)
    try:
        alice = ca.issue("alice", "URI:meshserve://tenant/alice,DNS:alice", usage="clientAuth")
        async with _channel(port, ca.cert, alice) as channel:
            assert await _who(channel) == "alice|meshserve://tenant/alice"
        await _refused(_channel(port, ca.cert))  # no client certificate
        await _refused(_channel(port, ca.cert, other.issue("mallory")))  # another CA's
        await _refused(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))  # plaintext
    finally:
        await server.stop(None)


async def test_server_name_override_checks_a_dns_name_instead_of_the_ip(tmp_path: pathlib.Path) -> None:
    """Pods advertise IPs; with MESH_INTERNAL_TLS_SERVER_NAME their certificates need only
    that name. Without it, a certificate lacking the IP SAN is refused."""
    ca = CA.create(tmp_path)
    srv, client = ca.issue("pod", "DNS:meshserve-internal"), ca.issue("router", usage="clientAuth")
    server, port = await _serve(ServerTLS(str(srv.cert), str(srv.key), str(ca.cert), require_client_cert=True))
    address = f"127.0.0.1:{port}"
    named = ChannelPool(1 << 20, ClientTLS(str(ca.cert), str(client.cert), str(client.key), "meshserve-internal"))
    by_ip = ChannelPool(1 << 20, ClientTLS(str(ca.cert), str(client.cert), str(client.key)))
    try:
        assert await _who(named.get(address)) == "router|"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _who(by_ip.get(address))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await named.close()
        await by_ip.close()
        await server.stop(None)


async def test_channel_pool_presents_a_rotated_client_certificate(tmp_path: pathlib.Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CA.create(tmp_path)
    srv = ca.issue("pod")
    server, port = await _serve(ServerTLS(str(srv.cert), str(srv.key), str(ca.cert), require_client_cert=True))
    files = _copy(ca.issue("router-old", usage="clientAuth"), tmp_path / "mounted")
    pool = ChannelPool(1 << 20, ClientTLS(str(ca.cert), str(files.cert), str(files.key)))
    address = f"127.0.0.1:{port}"
    try:
        first = pool.get(address)
        assert await _who(first) == "router-old|"
        _install(ca.issue("router-new", usage="clientAuth"), files)
        monkeypatch.setattr(rpc_server, "CLIENT_RECHECK_S", 0.0)
        second = pool.get(address)
        assert second is not first
        assert await _who(second) == "router-new|"
        assert pool.get(address) is second  # one new channel, not one per call
    finally:
        await pool.close()
        await server.stop(None)


async def test_health_port_answers_plaintext_probes_while_the_main_port_needs_tls(tmp_path: pathlib.Path) -> None:
    from mesh.cli import procs

    ca = CA.create(tmp_path)
    srv = ca.issue("server")
    health_port = procs.free_port()
    server, port = await _serve(ServerTLS(str(srv.cert), str(srv.key), str(ca.cert), require_client_cert=True),
                                health_port=health_port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:  # only health there
                await _who(channel)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            await server.set_serving(False)
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await _refused(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    finally:
        await server.stop(None)


def test_a_key_that_does_not_match_its_certificate_fails_at_start(tmp_path: pathlib.Path) -> None:
    ca = CA.create(tmp_path)
    one, two = ca.issue("one"), ca.issue("two")
    with pytest.raises(ValueError, match="MESH_ROUTER_TLS_CERT / MESH_ROUTER_TLS_KEY"):
        ServerTLS(str(one.cert), str(two.key), names=("MESH_ROUTER_TLS_CERT", "MESH_ROUTER_TLS_KEY", "")).credentials()
    with pytest.raises(ValueError, match="cert: cannot read"):
        ServerTLS(str(tmp_path / "absent.pem"), str(one.key)).credentials()
