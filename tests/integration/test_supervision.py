"""`mesh up` supervises its children: each one killed with -9 (a pod, the placement leader, the
router, Redis, etcd) is started again and the mesh serves a registered model correctly after
each; Ctrl-C still stops every child. Plus the supervisor's backoff on a child that keeps dying.

Regression test for issue 9 item 7: `mesh up` raised "<name> exited with -9" and stopped the
whole mesh when any one child died.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh import demo, types
from mesh.cli import procs
from mesh.cli.supervise import Supervisor
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2

pytestmark = pytest.mark.integration

X = np.array([[1, 2, 3, 4]], dtype=np.float32)


def _golden(model) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": X})[0]


class Up:
    """`mesh up` as a user runs it, its stdout read by a thread (so it never blocks on a pipe)."""

    def __init__(self, tmp: pathlib.Path, root: str, file_roots: tuple[pathlib.Path, ...] = ()) -> None:
        self.port, self.root = procs.free_port(), root
        env = {**os.environ, "MESH_ROOT": root, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli.main", "up", "--state-dir", str(tmp), "--port", str(self.port),
             "--lease-ttl", "3", "--placements", "2", "--capacity", "64MiB",
             "--allow-anonymous",  # its plain tritonclient / registry calls send no token
             *[arg for d in file_roots for arg in ("--file-root", str(d))]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> None:
        _wait(lambda: needle in self.text() or self.proc.poll() is not None, timeout, f"no {needle!r}")
        assert needle in self.text(), self.text()

    def etcd(self) -> str:
        line = next(x for x in self.lines if x.startswith("etcd at "))
        return line.split()[2].rstrip(",")

    def children(self) -> list[int]:
        """PIDs of every process (but `mesh up` itself) that carries this mesh's MESH_ROOT."""
        return [p for p in _processes_with_env(f"MESH_ROOT={self.root}") if p != self.proc.pid]

    def redis(self) -> list[int]:
        """redis-server rewrites its process title over its environment: found by its port."""
        line = next(x for x in self.lines if "usage telemetry in Redis at" in x)
        port = line.rsplit(":", 1)[1].split("/")[0]
        return [int(e.name) for e in pathlib.Path("/proc").iterdir() if e.name.isdigit()
                and _comm(int(e.name)) == "redis-server" and f":{port}" in _cmdline(int(e.name))]

    def child(self, marker: str = "", comm: str = "") -> int:
        """The one child whose environment holds `marker` (or whose command name is `comm`)."""
        found = [p for p in self.children() if (not marker or marker in _environ(p)) and
                 (not comm or _comm(p) == comm)]
        assert len(found) == 1, (marker, comm, found)
        return found[0]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def _environ(pid: int) -> list[str]:
    try:
        return pathlib.Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _one(pids: list[int]) -> int:
    assert len(pids) == 1, pids
    return pids[0]


def _processes_with_env(needle: str) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit() and needle in _environ(int(entry.name)):
            found.append(int(entry.name))
    return found


def _infer_until_ok(address: str, model_id: str, within: float = 90) -> np.ndarray:
    deadline, errors = time.monotonic() + within, []
    client = triton.InferenceServerClient(address)
    try:
        while True:
            inp = triton.InferInput("input", [1, 4], "FP32")
            inp.set_data_from_numpy(X)
            try:
                return client.infer(model_id, [inp], client_timeout=10).as_numpy("output")
            except InferenceServerException as exc:
                errors.append(exc.status())
                assert time.monotonic() < deadline, f"{model_id} never served again: {errors[-5:]}"
                time.sleep(0.2)
    finally:
        client.close()


def _leader(etcd: str, root: str) -> str:
    async def read() -> str:
        client = EtcdClient([etcd], timeout=2)
        try:
            kv = await client.get(Keys(root).leader())
        finally:
            await client.close()
        return types.decode(types.LeaderRecord, kv.value).holder_id if kv else ""

    for _ in range(100):
        try:
            if holder := asyncio.run(read()):
                return holder
        except Exception:  # etcd restarting
            pass
        time.sleep(0.2)
    raise TimeoutError("no placement leader")


def _register(router: str, model_id: str, path: pathlib.Path) -> None:
    with grpc.insecure_channel(router) as channel:
        registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(registry_pb2.RegisterModelRequest(
            spec=types_pb2.ModelSpec(model_id=model_id, storage_uri=path.resolve().as_uri())), timeout=30)


def _kill_and_wait_restart(up: Up, name: str, pid: int, find) -> int:
    """kill -9 `pid`; returns the new PID once the supervisor has started `name` again."""
    os.kill(pid, signal.SIGKILL)
    up.wait_for(f"{name} (pid {pid}) exited with code -9; restart", 30)
    up.wait_for(f"{name} restarted as pid", 60)
    new = find()
    assert new != pid
    return new


def test_mesh_up_restarts_killed_children_and_serves_after_each(tmp_path: pathlib.Path, mesh_root: str,
                                                               model_files) -> None:
    up = Up(tmp_path / "state", mesh_root, file_roots=(model_files["linear-5"].parent,))
    golden = _golden(demo.linear_model(1))  # demo-linear-a
    router = f"127.0.0.1:{up.port}"
    try:
        up.wait_for("Ctrl-C stops everything", 180)
        text = up.text()
        assert "2 placement replicas" in text and "placement-1 pid" in text, text
        np.testing.assert_allclose(_infer_until_ok(router, "demo-linear-a"), golden, rtol=1e-6)
        etcd = up.etcd()

        restarted = 0
        for pod in ("pod-0", "pod-1"):  # the pod serving demo-linear-a is one of them
            pid = up.child(f"MESH_RUNTIME_INSTANCE_ID={pod}")
            _kill_and_wait_restart(up, pod, pid, lambda pod=pod: up.child(f"MESH_RUNTIME_INSTANCE_ID={pod}"))
            np.testing.assert_allclose(_infer_until_ok(router, "demo-linear-a"), golden, rtol=1e-6)
            restarted += 1

        leader = _leader(etcd, mesh_root)
        pid = up.child(f"MESH_PLACEMENT_INSTANCE_ID={leader}")
        _kill_and_wait_restart(up, leader, pid, lambda: up.child(f"MESH_PLACEMENT_INSTANCE_ID={leader}"))
        # A model never loaded needs a placement leader to be served: the standby (or the restarted one).
        _register(router, "after-leader", model_files["linear-5"])
        out = _infer_until_ok(router, "after-leader")
        np.testing.assert_allclose(out, _golden(demo.linear_model(5)), rtol=1e-6)

        marker = f"MESH_ROUTER_LISTEN={router}"
        _kill_and_wait_restart(up, "router", up.child(marker), lambda: up.child(marker))
        np.testing.assert_allclose(_infer_until_ok(router, "demo-linear-a"), golden, rtol=1e-6)

        _kill_and_wait_restart(up, "redis", _one(up.redis()), lambda: _one(up.redis()))
        np.testing.assert_allclose(_infer_until_ok(router, "demo-linear-a"), golden, rtol=1e-6)

        _kill_and_wait_restart(up, "etcd", up.child(comm="etcd"), lambda: up.child(comm="etcd"))
        # Same data dir: the registrations survived the restart; a new leader is elected.
        assert _leader(etcd, mesh_root)
        np.testing.assert_allclose(_infer_until_ok(router, "after-leader"), _golden(demo.linear_model(5)),
                                   rtol=1e-6)
        assert up.proc.poll() is None, up.text()
        assert restarted == 2
    finally:
        children = up.children() + (up.redis() if "usage telemetry in Redis" in up.text() else [])
        os.killpg(up.proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        try:
            up.proc.wait(90)
        finally:
            if up.proc.poll() is None:
                os.killpg(up.proc.pid, signal.SIGKILL)
    assert up.proc.returncode == 0, up.text()
    assert len(children) == 7, children  # etcd, redis, 2 placements, 2 pods, router
    assert not up.children() and not up.redis(), f"mesh up left children: {up.children() + up.redis()}"


class _FakeMesh:
    """The part of LocalMesh the supervisor uses, over real short-lived child processes."""

    def __init__(self, code: int) -> None:
        self._lock = threading.RLock()
        self.code = code
        self.procs = {"crashy": self._start(), "victim": self._start(60)}
        self.started = 0

    def _start(self, sleep: float = 0) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", f"import time, sys; time.sleep({sleep}); sys.exit({self.code})"])

    def restart(self, name: str, old: subprocess.Popen) -> subprocess.Popen | None:
        with self._lock:
            if self.procs.get(name) is not old:
                return None
            self.started += 1
            self.procs[name] = self._start()
            return self.procs[name]


def test_supervisor_backs_off_a_child_that_keeps_dying_and_leaves_stopped_ones_alone(caplog) -> None:
    mesh = _FakeMesh(code=3)
    sup = Supervisor(mesh, base_s=0.1, max_s=0.4, stable_s=60, poll_s=0.02)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="mesh.cli.supervise")
    victim = mesh.procs["victim"]
    with mesh._lock:
        del mesh.procs["victim"]  # what LocalMesh.kill does before it kills: stopped on purpose
    victim.kill()
    sup.start()
    try:
        _wait(lambda: sup.restarts.get("crashy", 0) >= 5, 30, "crashy not restarted 5 times")
    finally:
        sup.close()
    assert "victim" not in sup.restarts
    assert sup.delay(1) == 0.1 and sup.delay(2) == 0.2 and sup.delay(3) == 0.4 and sup.delay(9) == 0.4
    exits = [r.getMessage() for r in caplog.records if "exited with code 3" in r.getMessage()]
    assert len(exits) >= 5
    assert exits[0].startswith("crashy (pid ") and "restart 1 in 0.1 s" in exits[0], exits[0]
    assert "restart 3 in 0.4 s" in exits[2] and "restart 5 in 0.4 s" in exits[4], exits
    for proc in mesh.procs.values():
        procs.stop(proc)
