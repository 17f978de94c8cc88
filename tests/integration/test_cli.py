"""`mesh up` and the client commands, as a user runs them: real processes, real etcd."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from mesh.cli import procs

pytestmark = pytest.mark.integration


def mesh_cmd(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_mesh_up_serves_demo_models_and_stops_cleanly(etcd_endpoint: str, tmp_path: pathlib.Path,
                                                     mesh_root: str) -> None:
    port = procs.free_port()
    env = {**os.environ, "MESH_ROOT": mesh_root, "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli.main", "up", "--etcd", etcd_endpoint, "--state-dir", str(tmp_path),
         "--port", str(port), "--capacity", "64MiB", "--routers", "2", "--placements", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    out: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert up.stdout is not None
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            out.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(out)
        assert "meshserve is up" in text, text
        assert f"mesh infer demo-linear-a --router 127.0.0.1:{port}" in text
        router = f"127.0.0.1:{port}"
        # --routers 2: every router's address is printed, and each one serves every model.
        routers_line = next(x for x in out if x.startswith("routers (any of them serves every model): "))
        routers = routers_line.split(": ", 1)[1].strip().split(", ")
        assert routers[0] == router and len(routers) == 2, routers_line
        second = mesh_cmd("infer", "demo-linear-a", "--router", routers[1], "--input", "input=[[1,2,3,4]]")
        assert second.returncode == 0 and "output FP32 [1, 3]" in second.stdout, second.stderr
        assert "2 placement replicas" in text and "placement-1 pid" in text, text

        listing = mesh_cmd("list", "--router", router)
        assert listing.returncode == 0, listing.stderr
        assert "demo-linear-a" in listing.stdout and "NOT_LOADED" in listing.stdout

        result = mesh_cmd("infer", "demo-linear-a", "--router", router, "--input", "input=[[1,2,3,4]]")
        assert result.returncode == 0, result.stderr
        assert "output FP32 [1, 3]" in result.stdout

        status = mesh_cmd("status", "demo-linear-a", "--router", router)
        assert status.returncode == 0 and "MODEL_LOADED" in status.stdout, status.stdout

        model = tmp_path / "mine.onnx"
        from mesh import demo

        demo.save(demo.linear_model(11), model)
        reg = mesh_cmd("register", "mine", str(model), "--router", router, "--label", "team=a",
                       "--max-copies", "2", "--max-batch-size", "8", "--max-queue-delay-us", "100")
        assert reg.returncode == 0, reg.stderr
        bad = mesh_cmd("register", "other", str(model), "--router", router, "--label", "no-equals-sign")
        assert bad.returncode == 2 and "labels are KEY=VALUE" in bad.stderr
        dup = mesh_cmd("register", "mine", str(model), "--router", router)
        assert dup.returncode == 1 and "ALREADY_EXISTS" in dup.stderr
        rand = mesh_cmd("infer", "mine", "--router", router, "--batch", "2")  # random input from metadata
        assert rand.returncode == 0, rand.stderr
        assert "output FP32 [2, 3]" in rand.stdout
        shown = mesh_cmd("status", "mine", "--router", router)
        assert "max copies 2, max batch size 8, max queue delay us 100" in shown.stdout, shown.stdout
        assert "placement: placed on pod-" in shown.stdout, shown.stdout
        assert mesh_cmd("unregister", "mine", "--router", router).returncode == 0
        gone = mesh_cmd("status", "mine", "--router", router)
        assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
    assert up.returncode == 0
    assert not _processes_with_env(f"MESH_ROOT={mesh_root}"), "mesh up left children running"


def _processes_with_env(needle: str) -> list[int]:
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found
