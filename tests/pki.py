"""Test certificates made with openssl: a CA and leaf certificates it signs, each with the SANs
and key usages a test asks for. Used by the etcd TLS tests and the gRPC TLS / mTLS tests; every
file lands under the folder the test gives (its tmp_path).
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclasses.dataclass(frozen=True)
class Leaf:
    cert: pathlib.Path
    key: pathlib.Path


@dataclasses.dataclass(frozen=True)
class CA:
    """A self-signed CA in `folder` (ca.pem, ca.key) that issues leaf certificates."""

    folder: pathlib.Path
    name: str = "test-ca"

    @property
    def cert(self) -> pathlib.Path:
        return self.folder / f"{self.name}.pem"

    @property
    def key(self) -> pathlib.Path:
        return self.folder / f"{self.name}.key"

    @classmethod
    def create(cls, folder: pathlib.Path, name: str = "test-ca") -> CA:
        folder.mkdir(parents=True, exist_ok=True)
        ca = cls(folder, name)
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                 "-keyout", ca.key.name, "-out", ca.cert.name, cwd=folder)
        return ca

    def issue(
        self,
        name: str,
        sans: str = "IP:127.0.0.1,DNS:localhost",
        usage: str = "serverAuth,clientAuth",
    ) -> Leaf:
        """A leaf certificate with CN=`name`, signed by this CA (files <ca>-<name>.pem/.key)."""
        stem = f"{self.name}-{name}"
        ext = self.folder / f"{stem}.cnf"
        ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage={usage}\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{stem}.key",
                 "-out", f"{stem}.csr", cwd=self.folder)
        _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", self.cert.name, "-CAkey", self.key.name,
                 "-CAcreateserial", "-days", "1", "-extfile", ext.name, "-out", f"{stem}.pem", cwd=self.folder)
        return Leaf(self.folder / f"{stem}.pem", self.folder / f"{stem}.key")


def make_pki(d: pathlib.Path) -> dict[str, pathlib.Path]:
    """A CA, a server and a client certificate (both IP:127.0.0.1, DNS:localhost), as the
    etcd TLS tests want them: ca, cert, key, client_cert, client_key."""
    ca = CA.create(d)
    server, client = ca.issue("server"), ca.issue("client")
    return {"ca": ca.cert, "cert": server.cert, "key": server.key,
            "client_cert": client.cert, "client_key": client.key}
