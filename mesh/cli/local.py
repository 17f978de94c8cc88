"""A whole mesh on this machine as child processes: etcd (unless given), Redis (optional, for
usage telemetry), placement replicas, runtime pods and routers. Used by `mesh up` and by the
integration tests and benchmarks; every child is stopped by its own PID.

With `supervise=True` (what `mesh up` uses) a child that exits on its own is restarted with the
same ports, environment and data dir (mesh.cli.supervise); kill(), stop_process() and stop()
are intentional and never restarted. Without it (the tests' default) a dead child stays dead.

Routers require credentials: the mesh's admin token is <state dir>/token (minted on first
start, mode 0600, given to the routers as a bootstrap admin digest) and this class's own calls
send it. Tests and benchmarks whose clients send no token pass `allow_anonymous=True`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable

import grpc
from prometheus_client.parser import text_string_to_metric_families

from mesh import credentials
from mesh.cli import procs
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2


@dataclasses.dataclass
class LocalMesh:
    state_dir: pathlib.Path
    router_port: int = 0
    rest_port: int = 0  # the first router's REST port (0: a free one); the others get free ports
    pods: int = 2
    capacity: str = "64MiB"
    etcd: str = ""  # host:port of an existing etcd; empty starts one
    root: str = "/meshserve"
    lease_ttl_s: int = 5
    redis: bool = False  # start a redis-server child and pass MESH_REDIS_URL to every process
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    pod_env: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)
    # child name ("router", "placement", "pod-0", ...) -> extra environment, e.g. its own
    # TLS certificate (MESH_INTERNAL_TLS_CERT / _KEY, MESH_ROUTER_TLS_*)
    process_env: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    # How this object's own calls reach the routers (readiness, register, get_model): None is
    # plaintext; grpc.ssl_channel_credentials(...) when the routers' port speaks TLS.
    router_credentials: grpc.ChannelCredentials | None = None
    procs: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    placements: int = 1  # placement replicas: "placement", "placement-1", ...
    routers: int = 1  # routers: "router" (on router_port), "router-1", ...
    supervise: bool = False  # restart children that exit on their own (mesh up)
    # Folders file:// models may be registered from (MESH_ROUTER_FILE_ROOTS and
    # MESH_RUNTIME_FILE_ROOTS); empty: the state folder's models/ and the temporary folder,
    # where tests and benchmarks write theirs. `mesh up` names its own.
    file_roots: tuple[str, ...] = ()
    # Routers admit callers without credentials as the default tenant (MESH_ROUTER_ALLOW_ANONYMOUS).
    allow_anonymous: bool = False
    token: str = ""  # the admin token; empty: <state dir>/token, minted there on first start
    restart_backoff_s: float = 0.5  # first restart delay; doubles per quick failure
    restart_backoff_max_s: float = 10.0
    # name -> how to start that child again with the same ports, environment and data dir
    _starters: dict[str, Callable[[], subprocess.Popen]] = dataclasses.field(default_factory=dict, repr=False)
    _lock: threading.RLock = dataclasses.field(default_factory=threading.RLock, repr=False)
    _supervisor: object = dataclasses.field(default=None, repr=False)

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.ports['router']}"

    @property
    def router_addresses(self) -> list[str]:
        return [f"127.0.0.1:{self.ports[router_name(i)]}" for i in range(self.routers)]

    @property
    def rest_address(self) -> str:
        """host:port of the first router's REST (KServe V2 HTTP) front."""
        return f"127.0.0.1:{self.ports['router-rest']}"

    @property
    def rest_addresses(self) -> list[str]:
        return [f"127.0.0.1:{self.ports[router_name(i) + '-rest']}" for i in range(self.routers)]

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts the supervisor made, by child name (empty without supervision)."""
        return dict(self._supervisor.restarts) if self._supervisor is not None else {}  # type: ignore[attr-defined]

    def log(self, name: str) -> pathlib.Path:
        return self.state_dir / "logs" / f"{name}.log"

    @property
    def token_file(self) -> pathlib.Path:
        return self.state_dir / credentials.TOKEN_FILE

    @property
    def auth_metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata with the admin token, for clients of this mesh's routers."""
        return credentials.metadata(self.token)

    def start(self, timeout: float = 60.0) -> LocalMesh:
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        if not self.token:
            self.token = credentials.state_token(self.state_dir)
        try:
            if not self.etcd:
                self.ports["etcd"], self.ports["etcd-peer"] = _port(2379), procs.free_port()
                self.start_etcd()
                self.etcd = f"127.0.0.1:{self.ports['etcd']}"
            if self.redis:
                self.start_redis()
            for i in range(self.placements):
                self.start_placement(placement_name(i))
            for i in range(self.pods):
                self.start_pod(i)
            for i in range(self.routers):
                self.start_router(i)
            self.wait_ready(timeout)
            if self.supervise:
                from mesh.cli.supervise import Supervisor

                self._supervisor = Supervisor(self, self.restart_backoff_s, self.restart_backoff_max_s)
                self._supervisor.start()  # type: ignore[attr-defined]
        except BaseException:
            self.stop()
            raise
        return self

    # -- children ---------------------------------------------------------------------------

    def _add(self, name: str, starter: Callable[[], subprocess.Popen]) -> subprocess.Popen:
        proc = starter()
        with self._lock:
            self._starters[name] = starter
            self.procs[name] = proc
        return proc

    def start_etcd(self) -> None:
        """Starts (or restarts) the etcd child on the same data dir and ports, so its state survives."""
        client, peer = self.ports["etcd"], self.ports["etcd-peer"]
        self._add("etcd", lambda: procs.start_etcd(self.state_dir / "etcd", client, peer, self.log("etcd")))

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0" if "redis" in self.ports else ""

    def start_redis(self) -> None:
        """Starts (or restarts, on the same port) the Redis child."""
        port = self.ports.setdefault("redis", procs.free_port())
        self._add("redis", lambda: start_redis(port, self.log("redis")))

    def roots(self) -> list[str]:
        """The file roots routers and pods get (canonical: the pods compare canonical paths)."""
        roots = self.file_roots or (str(self.state_dir / "models"), tempfile.gettempdir())
        return [os.path.realpath(r) for r in roots]

    def common_env(self) -> dict[str, str]:
        roots = ",".join(self.roots())
        env = {
            "MESH_ROUTER_FILE_ROOTS": roots,
            "MESH_RUNTIME_FILE_ROOTS": roots,
            "MESH_ETCD_ENDPOINTS": self.etcd,
            "MESH_ROOT": self.root,
            "MESH_LEASE_TTL_S": str(self.lease_ttl_s),
            # No load balancer on one machine to take a stopping router out of rotation: no
            # settle period (its 5 s default would slow every stop); `env` may set one.
            "MESH_ROUTER_DRAIN_SETTLE_S": "0",
        }
        if self.redis_url:
            env["MESH_REDIS_URL"] = self.redis_url
        return {**env, **self.env}

    def _spawn(self, name: str, kind: str, env: dict[str, str]) -> subprocess.Popen:
        # A restart keeps the metrics port, so scrape(name) keeps working.
        metrics_port = self.ports.setdefault(f"{name}-metrics", procs.free_port())
        full = {**self.common_env(), **env, **self.process_env.get(name, {}),
                f"MESH_{kind.upper()}_METRICS_PORT": str(metrics_port)}
        return self._add(name, lambda: procs.start_mesh_process([kind], full, self.log(name)))

    def start_placement(self, name: str) -> None:
        self.ports[name] = procs.free_port()
        self._spawn(name, "placement", {"MESH_PLACEMENT_LISTEN": f"127.0.0.1:{self.ports[name]}",
                                        "MESH_PLACEMENT_INSTANCE_ID": name})

    def start_pod(self, i: int, env: dict[str, str] | None = None) -> None:
        name = f"pod-{i}"
        self.ports[name] = procs.free_port()
        self._spawn(name, "runtime", {
            "MESH_RUNTIME_LISTEN": f"127.0.0.1:{self.ports[name]}",
            "MESH_RUNTIME_INSTANCE_ID": name,
            "MESH_RUNTIME_CAPACITY": self.capacity,
            "MESH_RUNTIME_CACHE_DIR": str(self.state_dir / "cache" / name),
            **self.pod_env.get(i, {}),
            **(env or {}),
        })

    def start_router(self, i: int = 0) -> None:
        """Starts router `i` ("router" is 0); a router started again keeps its port."""
        name = router_name(i)
        if name not in self.ports:
            self.ports[name] = (self.router_port or procs.free_port()) if i == 0 else procs.free_port()
        if f"{name}-rest" not in self.ports:
            self.ports[f"{name}-rest"] = (self.rest_port or procs.free_port()) if i == 0 else procs.free_port()
        self._spawn(name, "router", {
            "MESH_ROUTER_LISTEN": f"127.0.0.1:{self.ports[name]}",
            "MESH_ROUTER_REST_LISTEN": f"127.0.0.1:{self.ports[name + '-rest']}",
            "MESH_ROUTER_ADMIN_TOKEN_SHA256": credentials.digest(self.token),
            "MESH_ROUTER_ALLOW_ANONYMOUS": "true" if self.allow_anonymous else "false",
        })

    def restart(self, name: str, old: subprocess.Popen) -> subprocess.Popen | None:
        """Starts `name` again the way it was started, unless it was stopped on purpose
        meanwhile (then returns None). Used by the supervisor."""
        with self._lock:
            if self.procs.get(name) is not old:
                return None
            starter = self._starters[name]
        proc = starter()  # outside the lock: etcd takes a while to listen
        with self._lock:
            if self.procs.get(name) is old:
                self.procs[name] = proc
                return proc
        procs.stop(proc)  # killed or stopped while we restarted it
        return None

    def pid(self, name: str) -> int:
        with self._lock:
            return self.procs[name].pid

    def children(self) -> dict[str, int]:
        """name -> PID of every child now (a snapshot; the supervisor may replace them)."""
        with self._lock:
            return {name: proc.pid for name, proc in self.procs.items()}

    def resume_all(self) -> None:
        """SIGCONT to every child: one left stopped by a fault would ignore SIGTERM."""
        for pid in self.children().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    # -- readiness --------------------------------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Until every router answers ServerReady, a placement leader exists and every pod is in etcd."""
        deadline = time.monotonic() + timeout
        for i in range(self.routers):
            name = router_name(i)
            procs.wait_port("127.0.0.1", self.ports[name], timeout, self.procs[name])
        pods = {f"pod-{i}" for i in range(self.pods)}
        while time.monotonic() < deadline:
            self._check_alive()
            instances, leader = asyncio.run(self._read_cluster())
            if pods <= instances and leader and all(self.router_ready(a) for a in self.router_addresses):
                return
            time.sleep(0.1)
        raise TimeoutError(f"mesh not ready after {timeout}s; logs in {self.state_dir / 'logs'}")

    def _check_alive(self) -> None:
        with self._lock:
            children = list(self.procs.items())
        for name, proc in children:
            if proc.poll() is not None:
                tail = self.log(name).read_text(errors="replace")[-3000:] if self.log(name).exists() else ""
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    async def _read_cluster(self) -> tuple[set[str], bool]:
        client = EtcdClient([self.etcd], timeout=2)
        keys = Keys(self.root)
        try:
            kvs, _ = await client.get_prefix(keys.prefix("instances"))
            leader = await client.get(keys.leader())
        finally:
            await client.close()
        return {kv.key.rsplit("/", 1)[-1] for kv in kvs}, leader is not None

    def router_ready(self, address: str | None = None) -> bool:
        """True when the router at `address` (default: the first) answers ServerReady."""
        with self.router_channel(address) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")
            try:
                return call(b"", timeout=1, metadata=self.auth_metadata) == b"\x08\x01"
            except grpc.RpcError:
                return False

    def router_channel(self, address: str | None = None) -> grpc.Channel:
        """A channel to the router at `address` (default: the first), over TLS when
        router_credentials are set."""
        target = address or self.router_address
        if self.router_credentials is None:
            return grpc.insecure_channel(target)
        return grpc.secure_channel(target, self.router_credentials)

    def scrape(self, name: str) -> dict[str, float]:
        """The Prometheus samples of one process: 'metric{label="v",...}' -> value."""
        url = f"http://127.0.0.1:{self.ports[name + '-metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def wait_instances(self, names: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            instances, _ = asyncio.run(self._read_cluster())
            if instances == names:
                return
            time.sleep(0.1)
        raise TimeoutError(f"instances never became {sorted(names)}")

    # -- the registration API, as a client ------------------------------------------------

    def register(self, model_id: str, path: pathlib.Path | str, **spec: object) -> None:
        """Registers a model through the router (a path becomes a file:// URI)."""
        uri = path if isinstance(path, str) else path.resolve().as_uri()
        with self.router_channel() as channel:
            registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(
                registry_pb2.RegisterModelRequest(
                    spec=types_pb2.ModelSpec(model_id=model_id, storage_uri=uri, **spec)),  # type: ignore[arg-type]
                timeout=10, metadata=self.auth_metadata,
            )

    def get_model(self, model_id: str) -> types_pb2.ModelStatus:
        with self.router_channel() as channel:
            return registry_pb2_grpc.ModelRegistryStub(channel).GetModel(
                registry_pb2.GetModelRequest(model_id=model_id), timeout=10, metadata=self.auth_metadata)

    # -- stopping (always intentional: never restarted) -------------------------------------

    def _take(self, name: str) -> subprocess.Popen:
        with self._lock:
            self._starters.pop(name, None)
            return self.procs.pop(name)

    def stop_process(self, name: str) -> int | None:
        """Graceful stop (SIGTERM) of one child; returns its exit code."""
        return procs.stop(self._take(name))

    def kill(self, name: str) -> None:
        """kill -9 of one child, which then stays dead (the caller restarts it if it wants)."""
        proc = self._take(name)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        """The supervisor first (nothing is restarted from here on), then routers, placement
        and pods, etcd and Redis last; each child by its own PID."""
        if self._supervisor is not None:
            self._supervisor.close()  # type: ignore[attr-defined]
            self._supervisor = None
        with self._lock:
            order = sorted(self.procs, key=lambda n: (n in ("etcd", "redis"), not n.startswith("router")))
        for name in order:
            with contextlib.suppress(KeyError):
                procs.stop(self._take(name))


def router_name(i: int) -> str:
    return "router" if i == 0 else f"router-{i}"


def placement_name(i: int) -> str:
    return "placement" if i == 0 else f"placement-{i}"


def start_redis(port: int, log_path: pathlib.Path, timeout: float = 20.0) -> subprocess.Popen:
    """redis-server on 127.0.0.1:`port`, no persistence; stop it by its PID (procs.stop)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "yes"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    procs.wait_or_stop(proc, port, timeout)
    return proc


def _port(preferred: int) -> int:
    import socket

    with contextlib.closing(socket.socket()) as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return procs.free_port()
