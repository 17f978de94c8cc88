"""TLS for meshserve's gRPC servers and channels, from PEM files named by the settings.

Two uses (docs/SECURITY.md "TLS and mTLS"):
- the router's public port (MESH_ROUTER_TLS_*): server TLS, optionally requiring client
  certificates (mutual TLS, an alternative to tokens; peer_certificate() gives the verified one);
- the internal hops router -> pod, router -> placement, placement -> pod (MESH_INTERNAL_TLS_*):
  one internal CA, every process with its own certificate; servers require a client certificate
  from that CA (a plaintext or unknown client fails the handshake), clients check the server
  against the CA and present their own.

Rotation without restarts. Servers use grpc's dynamic credentials: grpc asks for a fresh
configuration before each handshake, and the fetcher answers from a stat() of the files
(inode, mtime, size), reading them again only when one changed; a half-written set that does
not load is logged and the previous one kept. Channels re-check their files every
CLIENT_RECHECK_S; on a change, new channels are built with the new certificate and the old ones
closed once their calls finish (ChannelPool in mesh/rpc/server.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import threading

import grpc

log = logging.getLogger(__name__)

CLIENT_RECHECK_S = 10.0  # how often a channel pool looks at its client certificate files again

Signature = tuple[tuple[int, int, int], ...]


def _signature(paths: tuple[str, ...]) -> Signature:
    out = []
    for path in paths:
        st = os.stat(path)  # follows symlinks: a Kubernetes Secret update swaps ..data
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _read(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path} ({exc.strerror})") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{setting}: {path} is not a PEM file")
    return data


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key files, and the CA its clients' certificates must chain
    to when `require_client_cert`."""

    cert: str
    key: str
    client_ca: str = ""
    require_client_cert: bool = False
    # Setting names, for error messages an operator can act on.
    names: tuple[str, str, str] = ("cert", "key", "client CA")

    def files(self) -> tuple[str, ...]:
        return (self.cert, self.key, self.client_ca) if self.client_ca else (self.cert, self.key)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as they are now (ValueError naming the setting when one is unreadable)."""
        key, cert = _read(self.key, self.names[1]), _read(self.cert, self.names[0])
        ca = _read(self.client_ca, self.names[2]) if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Dynamic server credentials that pick up rotated files on the next handshake.

        Checked here once (a missing or mismatched file fails at start-up, naming the setting,
        instead of at every handshake)."""
        initial = self.configuration()
        _check_pair(self)
        return grpc.dynamic_ssl_server_credentials(initial, _Reloader(self), self.require_client_cert)


def _check_pair(tls: ServerTLS) -> None:
    """grpc only notices a key that does not match its certificate at a handshake (every one
    fails); the ssl module's loader checks the pair now."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{tls.names[0]} / {tls.names[1]}: not a matching certificate and key "
                         f"({getattr(exc, 'reason', None) or exc})") from None


class _Reloader:
    """grpc's certificate configuration fetcher: called (on a grpc thread) before handshakes;
    None keeps the configuration in use."""

    def __init__(self, tls: ServerTLS) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._seen = self._stat()
        self.reloads = 0

    def _stat(self) -> Signature | None:
        try:
            return _signature(self.tls.files())
        except OSError:
            return None  # mid-rotation (a file briefly absent): keep what is loaded

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        now = self._stat()
        with self._lock:
            if now is None or now == self._seen:
                return None
            self._seen = now
        try:
            config = self.tls.configuration()
            _check_pair(self.tls)  # a new certificate whose new key is not written yet
        except ValueError as exc:
            log.warning("TLS files changed but cannot be loaded (%s); keeping the previous certificate", exc)
            return None
        self.reloads += 1
        log.info("TLS certificate files changed; new handshakes use the new certificate (%s)", self.tls.cert)
        return config


@dataclasses.dataclass(frozen=True)
class ClientTLS:
    """What an internal client trusts (CA), presents (cert, key) and checks servers' names
    against (`server_name`; empty: the host of the address)."""

    ca: str
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def files(self) -> tuple[str, ...]:
        return tuple(p for p in (self.ca, self.cert, self.key) if p)

    def signature(self) -> Signature | None:
        try:
            return _signature(self.files())
        except OSError:
            return None

    def credentials(self) -> grpc.ChannelCredentials:
        ca = _read(self.ca, "MESH_INTERNAL_TLS_CA")
        if not self.cert:
            return grpc.ssl_channel_credentials(ca)
        return grpc.ssl_channel_credentials(
            ca, _read(self.key, "MESH_INTERNAL_TLS_KEY"), _read(self.cert, "MESH_INTERNAL_TLS_CERT"))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _internal_files(common: object) -> tuple[str, str, str] | None:
    ca, cert, key = (getattr(common, f"internal_tls_{n}") for n in ("ca", "cert", "key"))
    if not (ca or cert or key):
        return None
    missing = [f"MESH_INTERNAL_TLS_{n.upper()}" for n, v in (("ca", ca), ("cert", cert), ("key", key)) if not v]
    if missing:
        raise ValueError(f"internal mutual TLS needs MESH_INTERNAL_TLS_CA, _CERT and _KEY; missing: {', '.join(missing)}")
    return ca, cert, key


def internal_server_tls(common: object) -> ServerTLS | None:
    """The server side of internal mTLS (placement, pods), or None when it is off."""
    files = _internal_files(common)
    if files is None:
        return None
    ca, cert, key = files
    return ServerTLS(cert, key, ca, require_client_cert=True,
                     names=("MESH_INTERNAL_TLS_CERT", "MESH_INTERNAL_TLS_KEY", "MESH_INTERNAL_TLS_CA"))


def internal_client_tls(common: object) -> ClientTLS | None:
    """The client side of internal mTLS (router, placement), or None when it is off."""
    files = _internal_files(common)
    if files is None:
        return None
    ca, cert, key = files
    return ClientTLS(ca, cert, key, getattr(common, "internal_tls_server_name", ""))


def public_server_tls(settings: object) -> ServerTLS | None:
    """The router's public port (RouterSettings), or None for plaintext."""
    cert, key, ca = (getattr(settings, f"tls_{n}") for n in ("cert", "key", "client_ca"))
    require = getattr(settings, "tls_client_auth", "none") == "require"
    if not (cert or key):
        if ca or require:
            raise ValueError("MESH_ROUTER_TLS_CLIENT_CA / MESH_ROUTER_TLS_CLIENT_AUTH need server TLS: "
                             "set MESH_ROUTER_TLS_CERT and MESH_ROUTER_TLS_KEY")
        return None
    if not (cert and key):
        raise ValueError("router TLS needs both MESH_ROUTER_TLS_CERT and MESH_ROUTER_TLS_KEY")
    if require and not ca:
        raise ValueError("MESH_ROUTER_TLS_CLIENT_AUTH=require needs MESH_ROUTER_TLS_CLIENT_CA")
    if ca and not require:
        raise ValueError("MESH_ROUTER_TLS_CLIENT_CA is set but client certificates are not asked for: "
                         "set MESH_ROUTER_TLS_CLIENT_AUTH=require (or unset the CA)")
    return ServerTLS(cert, key, ca, require_client_cert=require,
                     names=("MESH_ROUTER_TLS_CERT", "MESH_ROUTER_TLS_KEY", "MESH_ROUTER_TLS_CLIENT_CA"))


@dataclasses.dataclass(frozen=True)
class PeerCertificate:
    """A client certificate the TLS handshake verified (only present when the server requires
    client certificates: grpc's Python TLS never asks for one otherwise)."""

    common_name: str
    sans: tuple[str, ...]  # every subject alternative name, as grpc reports them
    uris: tuple[str, ...]  # the URI SANs among them
    pem: bytes


def peer_certificate(context: grpc.aio.ServicerContext) -> PeerCertificate | None:
    """The caller's verified client certificate, or None (plaintext, or TLS without one)."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"] or not auth.get("x509_pem_cert"):
        return None

    def texts(key: str) -> tuple[str, ...]:
        return tuple(v.decode(errors="replace") for v in auth.get(key, ()))

    cn = texts("x509_common_name")
    return PeerCertificate(cn[0] if cn else "", texts("x509_subject_alternative_name"), texts("peer_uri"),
                           auth["x509_pem_cert"][0])
