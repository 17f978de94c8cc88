"""One fault case's run: a fresh mesh (its own etcd) on loopback, hot models warmed, the load
generator started in its own process, time marks around the fault, then the row.

A case function gets a `Run` and injects its fault with the helpers here (kill9, signal,
restart, leader, ...), marking `begin_fault()` / `end_fault()` / `close_during()`. Everything
it starts is stopped by its own PID in `close()`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from bench.faults import loadgen, observe, report
from bench.faults.loadgen import ModelLoad
from mesh import demo
from mesh.cli import procs
from mesh.cli.local import LocalMesh, router_name
from mesh.kv.keys import Keys
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2

LOADED = types_pb2.LOADED


@dataclasses.dataclass
class Options:
    quick: bool = False
    rate: float = 150.0
    deadline_s: float = 2.0
    lease_ttl_s: int = 10
    before_s: float = 10.0
    after_s: float = 10.0
    soak_minutes: float = 30.0
    work: pathlib.Path = pathlib.Path("/tmp/meshserve-faults")

    @classmethod
    def make(cls, quick: bool, **kw: Any) -> Options:
        base = cls(quick=True, lease_ttl_s=5, before_s=5.0, after_s=5.0, soak_minutes=1.0) if quick else cls()
        return dataclasses.replace(base, **{k: v for k, v in kw.items() if v is not None})


@dataclasses.dataclass
class Scenario:
    pods: int = 2
    routers: int = 1
    placements: int = 2
    redis: bool = False
    capacity: str = "256MiB"
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    pod_env: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)
    two_copy: bool = True  # a hot model with min_copies=2 ("hot-2copy")
    singles: int = 2  # single-copy hot models hot-a, hot-b, ...
    max_inflight: int = 64
    cancel_fraction: float = 0.0
    stream_fraction: float = 0.0


def golden_model(model_id: str, path: pathlib.Path, seed: int, **kw: int) -> ModelLoad:
    """Writes linear_model(seed) to `path`; its input and onnxruntime's answer."""
    import onnxruntime as ort

    model = demo.linear_model(seed, **kw)
    demo.save(model, path)
    x = np.random.default_rng(1000 + seed).standard_normal((1, 4)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x})[0].astype(np.float32)
    return ModelLoad(model_id, x.tobytes(), (1, 4), y.tobytes())


def in_child(fn: Callable[..., Any], *args: Any, timeout: float = 120) -> Any:
    """Runs fn(*args) in a fresh (spawned) interpreter: inference answers are decoded with the
    generated `inference` module, which must not meet tritonclient's in this process."""
    ctx = mp.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result(timeout)


class Run:
    def __init__(self, case: str, title: str, scenario: Scenario, opts: Options) -> None:
        self.case, self.title, self.scenario, self.opts = case, title, scenario, opts
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = opts.work / f"{case}-{stamp}-{os.getpid()}"
        self.models_dir = self.dir / "models"
        self.marks: dict[str, Any] = {"rates": []}
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []
        self.extra: list[subprocess.Popen] = []  # proxies, stubs: stopped by PID in close()
        self.proxy: subprocess.Popen | None = None  # F14: the fault proxy in front of pod-1
        self.shas: set[str] = set()  # sha256 keys the cache audit may hold
        self.tmpfs: pathlib.Path | None = None
        self.cleanups: list[Callable[[], None]] = []  # run last, after every process stopped
        self.post: list[Callable[[dict[str, Any], list[tuple]], None]] = []  # (row, records) -> figures
        self.hot: list[ModelLoad] = []
        self.registrations: observe.Registrations | None = None
        self.mesh: LocalMesh | None = None
        self._load: mp.process.BaseProcess | None = None

    # -- setup ----------------------------------------------------------------------------

    def start(self) -> None:
        sc = self.scenario
        self.dir.mkdir(parents=True, exist_ok=True)
        root = f"/faults-{self.case.lower()}"
        self.mesh = LocalMesh(state_dir=self.dir / "mesh", pods=sc.pods, capacity=sc.capacity, root=root,
                              lease_ttl_s=self.opts.lease_ttl_s, redis=sc.redis,
                              # F17's artifact stub serves on loopback, refused by default
                              env={"MESH_ROUTER_ALLOWED_NETWORKS": "127.0.0.1/32",
                                   "MESH_RUNTIME_ALLOWED_NETWORKS": "127.0.0.1/32", **sc.env},
                              pod_env=dict(sc.pod_env), placements=sc.placements, routers=sc.routers,
                              allow_anonymous=True)
        self.mesh.start(timeout=120)
        seed = 0
        if sc.two_copy:
            self.hot.append(golden_model("hot-2copy", self.models_dir / "hot-2copy.onnx", seed))
        for i in range(sc.singles):
            seed += 1
            name = f"hot-{chr(ord('a') + i)}"
            self.hot.append(golden_model(name, self.models_dir / f"{name}.onnx", seed))
        for m in self.hot:
            self.register(m.model_id, self.models_dir / f"{m.model_id}.onnx",
                          min_copies=2 if m.model_id == "hot-2copy" else 0)
        for m in self.hot:
            self.warm(m)
        if sc.two_copy:
            self.wait_until(lambda: len(self.loaded_on("hot-2copy")) >= 2, 90, "hot-2copy never had 2 copies")
        golden_model("reg", self.models_dir / "reg.onnx", 99)  # what registrations during faults point at
        self.reg_uri = (self.models_dir / "reg.onnx").resolve().as_uri()
        self.start_revision = self.etcd_revision() + 1

    @property
    def routers(self) -> list[str]:
        return self.mesh.router_addresses  # type: ignore[union-attr]

    def register(self, model_id: str, path: pathlib.Path | str, router: str | None = None, **spec: Any) -> None:
        uri = path if isinstance(path, str) else path.resolve().as_uri()
        with grpc.insecure_channel(router or self.routers[0]) as channel:
            registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(registry_pb2.RegisterModelRequest(
                spec=types_pb2.ModelSpec(model_id=model_id, storage_uri=uri, **spec)), timeout=30)

    def get_model(self, model_id: str, router: str | None = None) -> types_pb2.ModelStatus:
        with grpc.insecure_channel(router or self.routers[0]) as channel:
            return registry_pb2_grpc.ModelRegistryStub(channel).GetModel(
                registry_pb2.GetModelRequest(model_id=model_id), timeout=10)

    def loaded_on(self, model_id: str) -> list[str]:
        return sorted(c.instance_id for c in self.get_model(model_id).copies if c.state == LOADED)

    def infer_code(self, model: ModelLoad, router: str | None = None, timeout: float = 30) -> str:
        """One request's status code (answer not checked: see checked())."""
        with grpc.insecure_channel(router or self.routers[0]) as channel:
            try:
                channel.unary_unary(loadgen.INFER)(loadgen.encode_request(model, "probe"), timeout=timeout)
                return "OK"
            except grpc.RpcError as exc:
                return exc.code().name  # type: ignore[attr-defined]

    def checked(self, models: list[ModelLoad], deadline_s: float = 30) -> list[tuple[str, str, float]]:
        """Requests sent together from a child process, answers checked against golden."""
        return in_child(loadgen.burst, self.routers, models, deadline_s, timeout=deadline_s + 60)

    def warm(self, model: ModelLoad, timeout: float = 90) -> None:
        deadline, code = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            code = self.infer_code(model, timeout=30)
            if code == "OK":
                return
            time.sleep(0.3)
        raise TimeoutError(f"{model.model_id} never served while warming: {code}")

    # -- load -----------------------------------------------------------------------------

    def start_load(self, rate: float | None = None, models: list[ModelLoad] | None = None,
                   max_seconds: float = 3600) -> None:
        sc, ctx = self.scenario, mp.get_context("spawn")
        rate = rate or self.opts.rate
        self._rate = ctx.Value("d", rate)
        self._limit = ctx.Value("i", sc.max_inflight)
        self._stop, ready = ctx.Event(), ctx.Event()
        self._records_path = self.dir / "records.json"
        config = loadgen.LoadConfig(
            addresses=self.routers, models=models or self.hot, rate=rate, deadline_s=self.opts.deadline_s,
            max_inflight=sc.max_inflight, cancel_fraction=sc.cancel_fraction,
            stream_fraction=sc.stream_fraction, max_seconds=max_seconds, run_id=self.case)
        self._config = config
        self._load = ctx.Process(target=loadgen.main, args=(config, self._rate, self._stop,
                                                            str(self._records_path), ready, self._limit),
                                 daemon=True)
        self._load.start()
        ready.wait(60)
        now = time.monotonic()
        self.marks.update(load_start=now, measure_start=now + 1.0)  # first second: connecting
        self.marks["rates"].append((now, rate))

    def set_rate(self, rate: float) -> None:
        self._rate.value = rate
        self.marks["rates"].append((time.monotonic(), rate))

    def set_inflight(self, limit: int) -> None:
        """Most requests in flight from now on (at most the scenario's max_inflight)."""
        self._limit.value = min(limit, self.scenario.max_inflight)

    def stop_load(self) -> dict[str, list]:
        self.marks["load_end"] = time.monotonic()
        self._stop.set()
        assert self._load is not None
        self._load.join(self.opts.deadline_s + 60)
        if self._load.is_alive():
            self._load.kill()
            raise RuntimeError("load generator did not stop")
        return json.loads(self._records_path.read_text())

    # -- marks ----------------------------------------------------------------------------

    def begin_fault(self, recovery_from: str = "fault_end") -> None:
        self.leaks_pre = observe.sample(self.mesh)
        self.marks["fault_start"] = time.monotonic()
        self.marks["recovery_from"] = recovery_from

    def end_fault(self) -> None:
        self.marks["fault_end"] = time.monotonic()

    def close_during(self, min_seconds: float = 0.0) -> None:
        """Ends the 'during' phase at fault_end, or `min_seconds` after fault_start if later."""
        self.marks.setdefault("fault_end", time.monotonic())
        until = max(self.marks["fault_end"], self.marks["fault_start"] + min_seconds)
        self.sleep(until - time.monotonic())
        self.marks["during_end"] = max(until, time.monotonic())

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def start_registrations(self) -> None:
        self.registrations = observe.Registrations(self.routers, self.reg_uri, f"reg-{self.case.lower()}",
                                                   deadline_s=self.opts.deadline_s)
        self.registrations.start()

    def stop_registrations(self) -> None:
        if self.registrations is not None:
            self.registrations.stop()

    # -- faults ---------------------------------------------------------------------------

    def pid(self, name: str) -> int:
        return self.mesh.pid(name)  # type: ignore[union-attr]

    def kill9(self, name: str) -> None:
        self.mesh.kill(name)  # type: ignore[union-attr]

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.pid(name), sig)

    def restart(self, name: str) -> None:
        """Starts a child that was killed or stopped again (pods on new ports, etcd, Redis and
        routers on their old ones)."""
        mesh = self.mesh
        assert mesh is not None
        if name == "etcd":
            mesh.start_etcd()
        elif name == "redis":
            mesh.start_redis()
        elif name.startswith("pod-"):
            mesh.start_pod(int(name.split("-")[1]))
        elif name.startswith("router"):
            mesh.start_router(next(i for i in range(mesh.routers) if router_name(i) == name))
        else:
            mesh.start_placement(name)

    def leader(self) -> str:
        from mesh import types

        async def read(client: Any) -> str:
            kv = await client.get(Keys(self.mesh.root).leader())  # type: ignore[union-attr]
            return types.decode(types.LeaderRecord, kv.value).holder_id if kv else ""

        try:
            return observe.etcd_call(self.mesh.etcd, read)  # type: ignore[union-attr]
        except Exception:
            return ""

    def etcd_revision(self) -> int:
        async def rev(client: Any) -> int:
            _, revision = await client.get_prefix(Keys(self.mesh.root).prefix())  # type: ignore[union-attr]
            return revision

        return observe.etcd_call(self.mesh.etcd, rev)  # type: ignore[union-attr]

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str = "") -> float | None:
        """Seconds until `predicate` held (polled every 0.1 s), or None after `timeout`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with contextlib.suppress(Exception):
                if predicate():
                    return round(time.monotonic() - start, 2)
            time.sleep(0.1)
        if what:
            self.notes.append(f"timed out after {timeout:.0f} s: {what}")
        return None

    def spawn(self, args: list[str], log: str, port: int | None = None) -> subprocess.Popen:
        """A helper process (proxy, stub) in its own session; stopped by its PID in close()."""
        out = open(self.dir / f"{log}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.extra.append(proc)
        if port is not None:
            procs.wait_port("127.0.0.1", port, 30, proc)
        return proc

    # -- the row --------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        self.stop_registrations()
        records = self.stop_load()
        self.marks.setdefault("fault_start", self.marks["load_end"])
        self.marks.setdefault("during_end", self.marks["load_end"])
        row: dict[str, Any] = {"case": self.case, "title": self.title,
                               "date": datetime.date.today().isoformat(), "quick": self.opts.quick,
                               "lease_ttl_s": self.opts.lease_ttl_s, "deadline_s": self.opts.deadline_s}
        row.update(report.summarize(records, self.marks, [m.model_id for m in self._config.models],
                                    self.routers, self.opts.deadline_s))
        if self.registrations is not None:
            row["registrations"] = self.registrations.check(self.mesh.etcd, self.mesh.root)  # type: ignore[union-attr]
        row["loads"] = observe.copy_history(self.mesh.etcd, self.mesh.root, self.start_revision)  # type: ignore[union-attr]
        post = observe.sample(self.mesh)
        row["leaks"] = observe.leak_deltas(getattr(self, "leaks_pre", post), post)
        row["leaks_summary"] = observe.leak_summary(row["leaks"])
        rows = report.as_rows(records)
        for fn in self.post:
            try:
                fn(row, rows)
            except Exception as exc:  # a figure that cannot be computed is a note, not a lost row
                self.notes.append(f"figure failed: {type(exc).__name__}: {exc}")
        row["figures"], row["notes"] = self.figures, self.notes
        t0 = self.marks["load_start"]
        row["marks_s"] = {k: round(v - t0, 2) for k, v in self.marks.items() if isinstance(v, float)}
        return row

    def close(self) -> None:
        if self._load is not None and self._load.is_alive():
            self._stop.set()
            self._load.join(10)
            if self._load.is_alive():
                self._load.kill()
        for proc in self.extra:
            with contextlib.suppress(Exception):
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)  # a stopped helper cannot handle SIGTERM
                procs.stop(proc, grace=3)
        if self.mesh is not None:
            self.mesh.resume_all()  # a child a case left frozen would ignore SIGTERM
            self.mesh.stop()
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()
