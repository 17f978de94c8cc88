"""The etcd connection over mutual TLS (MESH_ETCD_CA_FILE / CERT_FILE / KEY_FILE), against a
real etcd that requires client certificates."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from mesh.cli import procs
from mesh.errors import Unavailable
from mesh.kv.etcd import EtcdClient
from mesh.settings import CommonSettings

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: pathlib.Path) -> dict[str, pathlib.Path]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", "san.cnf", "-out", f"{name}.pem", cwd=d)
    return {name: d / file for name, file in
            (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"),
             ("client_cert", "client.pem"), ("client_key", "client.key"))}


async def test_mutual_tls_to_etcd(tmp_path: pathlib.Path) -> None:
    pki = _make_pki(tmp_path)
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
