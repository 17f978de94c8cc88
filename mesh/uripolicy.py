"""Which storage URIs meshserve fetches: one policy for the router's registration checks and
the pod's fetch checks (shared/RELIABILITY.md S2-S4, A5; docs/SECURITY.md "Storage that cannot
be aimed at the host").

- `parse`: length, characters, scheme; no credentials in the URI (user:password@, signed query
  strings: they would be stored in etcd and returned by ListModels), no `..` segments.
- `FileRoots`: file:// only under configured folders, matched on canonical paths; with none
  configured file:// is refused. The pod re-checks containment when it opens the file
  (puller/storage/file.py walks from the root's directory fd with O_NOFOLLOW).
- `Egress`: http(s) only to public unicast addresses, unless the operator allow-lists a network
  or a host. Every literal form is caught (decimal, hex and octal IPv4, IPv4-mapped, 6to4,
  NAT64 and Teredo IPv6); the pod checks every address a name resolves to and connects to the
  address it checked.
- `TenantPrefixes`: per-tenant URI prefixes (scheme + host/bucket + path on segment boundaries).

Refusals are PermissionDenied (policy) or InvalidArgument (malformed, credentials); messages
quote the URI with its query redacted and never name a configured folder.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import posixpath
import re
import socket
import urllib.parse
from collections.abc import Iterable, Mapping

from mesh.errors import InvalidArgument, PermissionDenied, quote_id

MAX_URI = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# Query parameters that carry credentials: S3/GCS/Azure signed URLs and common token names.
_SECRET_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    "x-goog-signature", "x-goog-credential", "googleaccessid", "sig", "sas", "token",
    "access_token", "id_token", "auth", "authorization", "api_key", "apikey", "key", "password",
    "passwd", "pwd", "secret", "client_secret",
})
_SECRET_WORDS = ("signature", "token", "credential", "secret", "password")

# Cloud metadata services (always refused unless their network is allow-listed by address).
METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "fd00:ec2::23", "100.100.100.200",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Folders no root may be or lie under: kernel and device trees, the host's configuration and
# runtime secrets (/run/secrets, the service account token).
_NEVER_ROOTS = ("/proc", "/sys", "/dev", "/etc", "/run", "/boot")


def redact(uri: str) -> str:
    """`uri` safe to echo or log: userinfo dropped, query values and fragment replaced."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return "(unparsable URI)"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{k}=…" for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def shown_stored(uri: str) -> str:
    """A stored URI as the API returns it: unchanged, unless it carries credentials (a record
    written before registration refused them): then redacted, so no API returns a secret."""
    try:
        check_no_credentials(uri, urllib.parse.urlsplit(uri))
    except (InvalidArgument, ValueError):
        return redact(uri)
    return uri


def show(uri: str) -> str:
    """The URI as an error message quotes it: redacted and truncated."""
    return quote_id(redact(uri), 160)


def parse(uri: str, schemes: Iterable[str], setting: str) -> urllib.parse.SplitResult:
    """The URI split; raises InvalidArgument when it is malformed, carries credentials or uses
    a scheme not in `schemes` (`setting` names the variable that lists them)."""
    if not uri or len(uri) > MAX_URI or _CONTROL.search(uri) or " " in uri:
        raise InvalidArgument(
            f"invalid storage_uri: give 1-{MAX_URI} characters without spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidArgument(f"invalid storage_uri {quote_id(uri, 160)}: not a parsable URI") from None
    scheme = parts.scheme.lower()
    allowed = sorted(schemes)
    if scheme not in allowed:
        raise InvalidArgument(
            f"invalid storage_uri {show(uri)}: scheme {scheme or '(none)'!r} is not accepted; "
            f"use one of {', '.join(allowed)} ({setting})")
    check_no_credentials(uri, parts)
    path = urllib.parse.unquote(parts.path)
    if "\x00" in path or ".." in path.split("/"):
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: '..' segments are not allowed")
    if scheme in ("http", "https"):
        check_http_form(uri, parts)
    elif scheme == "s3":
        check_s3_form(uri, parts)
    return parts


def check_no_credentials(uri: str, parts: urllib.parse.SplitResult) -> None:
    """Refuses userinfo and signed / token query parameters: they would be stored in etcd and
    shown to every client that lists models."""
    hint = ("store them in a Secret on the pods and pass its name as credentials_ref "
            "(mesh register --credentials-ref NAME)")
    if "@" in parts.netloc:
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: it carries credentials (userinfo "
                              f"before an @ in its host part); {hint}")
    for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        low = name.lower()
        if low in _SECRET_PARAMS or any(w in low for w in _SECRET_WORDS):
            raise InvalidArgument(
                f"invalid storage_uri {show(uri)}: its query parameter {quote_id(name, 40)} carries "
                f"credentials (a signed URL or token); {hint}")


def check_http_form(uri: str, parts: urllib.parse.SplitResult) -> None:
    host = parts.hostname or ""
    if not host:
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: a {parts.scheme} URI needs a host")
    if not host.isascii():
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: give an international host name in "
                              "its ASCII (punycode) form")
    if parts.fragment:
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: an http(s) URI takes no fragment (#...)")
    low = parts.path.lower()
    if "\\" in parts.path or "%2f" in low or "%5c" in low:
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: encoded slashes and backslashes "
                              "are not allowed in the path")


# -- s3:// --------------------------------------------------------------------------------------

# S3's bucket naming rules (3-63 characters, lower case, digits, dots and hyphens); an IPv4-like
# name is refused too. The endpoint is never in the URI: the pods' operator configures it
# (MESH_RUNTIME_S3_ENDPOINT_URL), so a user cannot aim a pod's S3 client at an address.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_S3_KEY = 1024


def check_s3_form(uri: str, parts: urllib.parse.SplitResult) -> None:
    """s3://bucket/key (one object) or s3://bucket/prefix/ (a folder): a valid bucket name, no
    port, endpoint, query or fragment, a key without empty, `.` or `..` segments."""
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"[0-9.]+", bucket):
        raise InvalidArgument(
            f"invalid storage_uri {show(uri)}: {quote_id(bucket, 70)} is not an S3 bucket name (3-63 "
            "characters from a-z 0-9 . -); give s3://bucket/key, the endpoint is the pods' setting "
            "(MESH_RUNTIME_S3_ENDPOINT_URL)")
    if parts.query or parts.fragment:
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: an s3 URI takes no query or fragment")
    key = urllib.parse.unquote(parts.path)[1:]
    segments = key.split("/")
    if key.endswith("/"):
        segments = segments[:-1]
    bad_segment = bool(key) and any(s in ("", ".", "..") for s in segments)
    if len(key.encode()) > MAX_S3_KEY or "\\" in key or bad_segment:
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: the key must be a path without empty, "
                              "'.' or '..' segments (at most 1024 bytes)")


def s3_location(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3 URI already checked by `parse`; a key ending in / is a prefix."""
    parts = urllib.parse.urlsplit(uri)
    return parts.netloc, urllib.parse.unquote(parts.path)[1:]


# -- file:// ------------------------------------------------------------------------------------


def file_path(uri: str, parts: urllib.parse.SplitResult | None = None) -> str:
    """The absolute, normalised path of a file URI; raises InvalidArgument."""
    parts = parts or urllib.parse.urlsplit(uri)
    if parts.scheme.lower() != "file":
        raise InvalidArgument(f"not a file:// URI: {show(uri)}")
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise InvalidArgument(
            f"invalid storage_uri {show(uri)}: a file URI needs an absolute path, file:///abs/path/model.onnx")
    if parts.query or parts.fragment:
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: a file URI takes no query or fragment")
    path = urllib.parse.unquote(parts.path)
    if "\x00" in path or ".." in path.split("/"):
        raise InvalidArgument(f"invalid storage_uri {show(uri)}: '..' segments are not allowed")
    return posixpath.normpath(path).replace("//", "/")


@dataclasses.dataclass(frozen=True)
class FileRoots:
    """Folders file:// artifacts must lie under: each as configured (normalised) and canonical."""

    roots: tuple[tuple[str, str], ...] = ()
    setting: str = "MESH_ROUTER_FILE_ROOTS"

    @classmethod
    def parse(cls, text: str, setting: str) -> FileRoots:
        """Comma-separated absolute folders; raises ValueError for a relative one or one that
        is, or lies under, a system tree (/, /proc, /sys, /dev, /etc, ...)."""
        roots = []
        for raw in (r.strip() for r in text.split(",")):
            if not raw:
                continue
            if not raw.startswith("/"):
                raise ValueError(f"{setting}: {raw!r} is not an absolute folder")
            norm = posixpath.normpath(raw).replace("//", "/")
            for real in {norm, os.path.realpath(norm)}:
                if real == "/" or any(real == n or real.startswith(n + "/") for n in _NEVER_ROOTS):
                    raise ValueError(f"{setting}: {raw!r} cannot be a file root (a system folder)")
            roots.append((norm, os.path.realpath(norm)))
        return cls(tuple(roots), setting)

    def __bool__(self) -> bool:
        return bool(self.roots)

    def containing(self, path: str) -> tuple[str, list[str]] | None:
        """(the root folder to open, the path's components below it) for the longest root
        that contains `path` lexically, in its configured or canonical form; else None."""
        best: tuple[str, list[str]] | None = None
        best_len = -1
        for norm, real in self.roots:
            for root in (norm, real):
                if (path == root or path.startswith(root + "/")) and len(root) > best_len:
                    rest = [p for p in path[len(root):].split("/") if p]
                    best, best_len = (real, rest), len(root)
        return best

    def under_canonical(self, real_path: str) -> bool:
        return any(real_path == real or real_path.startswith(real + "/") for _, real in self.roots)

    def refuse(self, uri: str) -> PermissionDenied:
        if not self.roots:
            return PermissionDenied(
                f"storage_uri {show(uri)} refused: file:// URIs are off because no file roots are "
                f"configured ({self.setting}); use http(s), or ask the operator to set it")
        return PermissionDenied(
            f"storage_uri {show(uri)} refused: file URIs must lie under the folders this mesh "
            f"serves models from ({self.setting})")

    def check_registration(self, uri: str, path: str) -> None:
        """Lexical containment, and canonical containment when the path exists here (a
        symlink that escapes); the pod re-checks when it opens the file."""
        if self.containing(path) is None:
            raise self.refuse(uri)
        if os.path.lexists(path) and not self.under_canonical(os.path.realpath(path)):
            raise self.refuse(uri)


# -- http(s) ------------------------------------------------------------------------------------


def host_literal(host: str) -> IP | None:
    """The address a host names literally, in any form a resolver accepts (2130706433,
    0x7f.1, 0177.0.0.1, 127.1, [::ffff:127.0.0.1]); None for a name."""
    host = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def embedded_v4(ip: IP) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64, compatible)."""
    if ip.version == 4:
        return []
    assert isinstance(ip, ipaddress.IPv6Address)
    out = []
    if ip.ipv4_mapped:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour:
        out.append(ip.sixtofour)
    if ip.teredo:
        out.extend(ip.teredo)
    if ip in _NAT64 or (int(ip) >> 32 == 0 and int(ip) > 1):  # NAT64, ::a.b.c.d (not :: or ::1)
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def forbidden_kind(ip: IP) -> str | None:
    """Why an address is not a public unicast one ("loopback", "metadata", ...); None if it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return forbidden_kind(ip.ipv4_mapped)  # ::ffff:a.b.c.d is a.b.c.d on the wire
    for inner in embedded_v4(ip):
        if (kind := forbidden_kind(inner)) is not None:
            return kind
    bare = ipaddress.ip_address(str(ip).split("%")[0])  # no IPv6 scope id
    if bare in METADATA:
        return "metadata"
    for kind, flag in (("unspecified", bare.is_unspecified), ("loopback", bare.is_loopback),
                       ("link-local", bare.is_link_local), ("multicast", bare.is_multicast),
                       ("private", bare.is_private), ("reserved", bare.is_reserved)):
        if flag:
            return kind
    return None if bare.is_global else "non-public"


@dataclasses.dataclass(frozen=True)
class Egress:
    """Which addresses http(s) fetches may reach: public unicast ones, plus `networks` (any
    address in them; a metadata address only when listed alone), plus for `hosts` (exact names or
    `*.suffix`) private and loopback addresses (never metadata, unspecified or multicast)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: tuple[str, ...] = ()
    setting: str = "MESH_ROUTER"  # the settings prefix, for messages

    @classmethod
    def parse(cls, networks: str, hosts: str, setting: str) -> Egress:
        nets = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks.split(",") if n.strip())
        names = tuple(h.strip().lower().rstrip(".") for h in hosts.split(",") if h.strip())
        return cls(nets, names, setting)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)

    def kind_refused(self, ip: IP, host: str) -> str | None:
        """The reason `ip` (reached as `host`) may not be fetched from, or None."""
        kind = forbidden_kind(ip)
        if kind is None:
            return None
        candidates = [ipaddress.ip_address(str(ip).split("%")[0]), *embedded_v4(ip)]
        for net in self.networks:
            for c in candidates:
                # A metadata address only by itself (a /32 or /128), never inside a wider range.
                if c.version == net.version and c in net and (kind != "metadata" or net.num_addresses == 1):
                    return None
        if self.host_allowed(host) and kind not in ("metadata", "unspecified", "multicast"):
            return None
        return kind

    def check(self, uri: str, ip: IP, host: str, literal: bool) -> None:
        """Raises PermissionDenied when `ip` may not be fetched from."""
        kind = self.kind_refused(ip, host)
        if kind is None:
            return
        what = f"a {kind} address" if literal else "an address meshserve does not fetch from"
        raise PermissionDenied(
            f"storage_uri {show(uri)} refused: its host {'is' if literal else 'resolves to'} {what} "
            "(loopback, private, link-local, metadata, multicast and reserved ranges are refused); "
            f"the operator can allow a network or host with {self.setting}_ALLOWED_NETWORKS / "
            f"{self.setting}_ALLOWED_HOSTS")

    def check_literal(self, uri: str, parts: urllib.parse.SplitResult) -> IP | None:
        """Checks a host that is an address literal; returns it (None for a name)."""
        host = parts.hostname or ""
        ip = host_literal(host)
        if ip is not None:
            self.check(uri, ip, host, literal=True)
        return ip


# -- per-tenant prefixes ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TenantPrefixes:
    """tenant -> URI prefixes its registrations must start with ("*": any other tenant, ""
    the default tenant). Empty: no per-tenant restriction."""

    prefixes: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    setting: str = "MESH_ROUTER_TENANT_STORAGE_PREFIXES"

    @classmethod
    def parse(cls, text: str, setting: str) -> TenantPrefixes:
        if not text.strip():
            return cls({}, setting)
        raw = json.loads(text)
        if not isinstance(raw, dict) or not all(
                isinstance(v, list) and all(isinstance(p, str) for p in v) for v in raw.values()):
            raise ValueError(f"{setting}: give a JSON object of tenant -> list of URI prefixes")
        for prefix in (p for v in raw.values() for p in v):
            if "://" not in prefix:
                raise ValueError(f"{setting}: {prefix!r} is not a URI prefix (scheme://host/path)")
        return cls({str(k): tuple(v) for k, v in raw.items()}, setting)

    def check(self, uri: str, parts: urllib.parse.SplitResult, tenant: str) -> None:
        if not self.prefixes:
            return
        allowed = self.prefixes.get(tenant, self.prefixes.get("*", ()))
        path = posixpath.normpath(urllib.parse.unquote(parts.path) or "/")
        for prefix in allowed:
            p = urllib.parse.urlsplit(prefix)
            if p.scheme.lower() != parts.scheme.lower() or p.netloc.lower() != parts.netloc.lower():
                continue
            base = urllib.parse.unquote(p.path).rstrip("/")
            if not base or path == base or path.startswith(base + "/"):
                return
        raise PermissionDenied(
            f"storage_uri {show(uri)} refused: tenant {quote_id(tenant or '(default)', 64)} may register "
            f"only URIs under its allowed prefixes ({self.setting})")
