"""The etcd connection over mutual TLS (MESH_ETCD_CA_FILE / CERT_FILE / KEY_FILE), against a
real etcd that requires client certificates."""

from __future__ import annotations

import pathlib

import pytest

from mesh.cli import procs
from mesh.errors import Unavailable
from mesh.kv.etcd import EtcdClient
from mesh.settings import CommonSettings
from tests.pki import make_pki

pytestmark = pytest.mark.integration


async def test_mutual_tls_to_etcd(tmp_path: pathlib.Path) -> None:
    pki = make_pki(tmp_path)
    port = procs.free_port()
    proc = procs.start_etcd(tmp_path / "data", port, procs.free_port(), tmp_path / "etcd.log", tls=pki)
    try:
        common = CommonSettings(etcd_endpoints=f"127.0.0.1:{port}", etcd_ca_file=str(pki["ca"]),
                                etcd_cert_file=str(pki["client_cert"]), etcd_key_file=str(pki["client_key"]))
        client = EtcdClient.from_settings(common)
        try:
            await client.put("/tls/k", b"v")
            kv = await client.get("/tls/k")
            assert kv is not None and kv.value == b"v"
        finally:
            await client.close()

        # By name too, first in a list with a dead member: the name is verified against the
        # certificate (DNS:localhost) and the client moves past the dead member.
        named = CommonSettings(etcd_endpoints=f"localhost:{procs.free_port()},localhost:{port}",
                               etcd_ca_file=str(pki["ca"]), etcd_cert_file=str(pki["client_cert"]),
                               etcd_key_file=str(pki["client_key"]))
        client = EtcdClient.from_settings(named)
        try:
            kv = await client.get("/tls/k")
            assert kv is not None and kv.value == b"v"
            assert client.member == f"localhost:{port}"
        finally:
            await client.close()

        plain = EtcdClient([f"127.0.0.1:{port}"], timeout=2)
        try:
            with pytest.raises(Unavailable):
                await plain.get("/tls/k")
        finally:
            await plain.close()
    finally:
        procs.stop(proc)


def test_client_certificate_needs_its_key() -> None:
    common = CommonSettings(etcd_ca_file="/nonexistent-ca.pem", etcd_cert_file="/c.pem")
    with pytest.raises(ValueError, match="MESH_ETCD_KEY_FILE"):
        EtcdClient.from_settings(common)
