"""A whole mesh on this machine as child processes: etcd (unless given), Redis (optional, for
usage telemetry), placement, runtime pods and routers. Used by `mesh up` and by the integration tests; every child is stopped by
its own PID."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import shutil
import subprocess
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from mesh.cli import procs
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2


@dataclasses.dataclass
class LocalMesh:
    state_dir: pathlib.Path
    router_port: int = 0
    pods: int = 2
    capacity: str = "64MiB"
    etcd: str = ""  # host:port of an existing etcd; empty starts one
    root: str = "/meshserve"
    lease_ttl_s: int = 5
    redis: bool = False  # start a redis-server child and pass MESH_REDIS_URL to every process
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    pod_env: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)
    ports: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.ports['router']}"

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd

    def log(self, name: str) -> pathlib.Path:
        return self.state_dir / "logs" / f"{name}.log"

    def start(self, timeout: float = 60.0) -> LocalMesh:
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            if not self.etcd:
                client, peer = _port(2379), procs.free_port()
                self.procs["etcd"] = procs.start_etcd(self.state_dir / "etcd", client, peer, self.log("etcd"))
                self.etcd = f"127.0.0.1:{client}"
            if self.redis:
                self.start_redis()
            self.start_placement("placement")
            for i in range(self.pods):
                self.start_pod(i)
            self.ports["router"] = self.router_port or procs.free_port()
            self._spawn("router", "router", {"MESH_ROUTER_LISTEN": self.router_address})
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0" if "redis" in self.ports else ""

    def start_redis(self) -> None:
        """Starts (or restarts, on the same port) the Redis child."""
        self.ports.setdefault("redis", procs.free_port())
        self.procs["redis"] = start_redis(self.ports["redis"], self.log("redis"))

    def common_env(self) -> dict[str, str]:
        env = {
            "MESH_ETCD_ENDPOINTS": self.etcd,
            "MESH_ROOT": self.root,
            "MESH_LEASE_TTL_S": str(self.lease_ttl_s),
        }
        if self.redis_url:
            env["MESH_REDIS_URL"] = self.redis_url
        return {**env, **self.env}

    def _spawn(self, name: str, kind: str, env: dict[str, str]) -> subprocess.Popen:
        self.ports[f"{name}-metrics"] = metrics_port = procs.free_port()
        env = {**env, f"MESH_{kind.upper()}_METRICS_PORT": str(metrics_port)}
        proc = procs.start_mesh_process([kind], {**self.common_env(), **env}, self.log(name))
        self.procs[name] = proc
        return proc

    def start_placement(self, name: str) -> None:
        self.ports[name] = procs.free_port()
        self._spawn(name, "placement", {"MESH_PLACEMENT_LISTEN": f"127.0.0.1:{self.ports[name]}",
                           "MESH_PLACEMENT_INSTANCE_ID": name})

    def start_pod(self, i: int) -> None:
        name = f"pod-{i}"
        self.ports[name] = procs.free_port()
        self._spawn(name, "runtime", {
            "MESH_RUNTIME_LISTEN": f"127.0.0.1:{self.ports[name]}",
            "MESH_RUNTIME_INSTANCE_ID": name,
            "MESH_RUNTIME_CAPACITY": self.capacity,
            "MESH_RUNTIME_CACHE_DIR": str(self.state_dir / "cache" / name),
            **self.pod_env.get(i, {}),
        })

    def wait_ready(self, timeout: float) -> None:
        """Until the router answers ServerReady, a placement leader exists and every pod is in etcd."""
        deadline = time.monotonic() + timeout
        procs.wait_port("127.0.0.1", self.ports["router"], timeout, self.procs["router"])
        pods = {f"pod-{i}" for i in range(self.pods)}
        while time.monotonic() < deadline:
            self._check_alive()
            instances, leader = asyncio.run(self._read_cluster())
            if pods <= instances and leader and self._router_ready():
                return
            time.sleep(0.1)
        raise TimeoutError(f"mesh not ready after {timeout}s; logs in {self.state_dir / 'logs'}")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
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

    def _router_ready(self) -> bool:
        with grpc.insecure_channel(self.router_address) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")
            try:
                return call(b"", timeout=1) == b"\x08\x01"
            except grpc.RpcError:
                return False

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

    def stop_process(self, name: str) -> int | None:
        """Graceful stop (SIGTERM) of one child; returns its exit code."""
        return procs.stop(self.procs.pop(name))

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
        with grpc.insecure_channel(self.router_address) as channel:
            registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(
                registry_pb2.RegisterModelRequest(
                    spec=types_pb2.ModelSpec(model_id=model_id, storage_uri=uri, **spec)),  # type: ignore[arg-type]
                timeout=10,
            )

    def get_model(self, model_id: str) -> types_pb2.ModelStatus:
        with grpc.insecure_channel(self.router_address) as channel:
            return registry_pb2_grpc.ModelRegistryStub(channel).GetModel(
                registry_pb2.GetModelRequest(model_id=model_id), timeout=10)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        """Routers first, then placement and pods, etcd last."""
        order = sorted(self.procs, key=lambda n: (n in ("etcd", "redis"), not n.startswith("router")))
        for name in order:
            procs.stop(self.procs.pop(name))


def start_redis(port: int, log_path: pathlib.Path, timeout: float = 20.0) -> subprocess.Popen:
    """redis-server on 127.0.0.1:`port`, no persistence; stop it by its PID (procs.stop)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "yes"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    procs.wait_port("127.0.0.1", port, timeout, proc)
    return proc


def _port(preferred: int) -> int:
    import socket

    with contextlib.closing(socket.socket()) as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return procs.free_port()
