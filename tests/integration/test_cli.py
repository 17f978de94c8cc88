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


def mesh_cmd(*args: str, timeout: float = 90, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_mesh_up_serves_demo_models_and_stops_cleanly(etcd_endpoint: str, tmp_path: pathlib.Path,
                                                     mesh_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = procs.free_port()
    # The client commands below find the admin token where `mesh up` wrote it, as its banner says.
    monkeypatch.setenv("MESH_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.delenv("MESH_TOKEN", raising=False)
    env = {**os.environ, "MESH_ROOT": mesh_root, "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli.main", "up", "--etcd", etcd_endpoint, "--state-dir", str(tmp_path),
         "--port", str(port), "--rest-port", "0", "--capacity", "64MiB", "--routers", "2", "--placements", "2",
         "--file-root", str(tmp_path / "mine")],
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
        assert f"admin token in {tmp_path / 'token'} (mode 0600)" in text, text
        assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
        no_token = {**os.environ, "MESH_TOKEN_FILE": str(tmp_path / "absent")}
        refused = mesh_cmd("list", "--router", router, env=no_token)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
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

        # The REST front the banner names answers curl-style requests for the same models.
        rest_line = next(x for x in out if x.startswith("REST (KServe V2 HTTP"))
        rest = rest_line.split(" at ", 1)[1].split(" ", 1)[0]
        import httpx

        auth = {"Authorization": "Bearer " + (tmp_path / "token").read_text().strip()}
        assert httpx.get(f"{rest}/v2/health/ready", timeout=10).status_code == 200
        answer = httpx.post(f"{rest}/v2/models/demo-linear-a/infer", headers=auth, timeout=30, json={
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [1, 3], answer.text
        assert httpx.post(f"{rest}/v2/models/demo-linear-a/infer", timeout=30, json={
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).status_code == 401
        routers_rest = next(x for x in out if x.startswith("their REST fronts: ")).split(": ", 1)[1].strip().split(", ")
        assert len(routers_rest) == 2 and routers_rest[0] == rest, routers_rest

        status = mesh_cmd("status", "demo-linear-a", "--router", router)
        assert status.returncode == 0 and "MODEL_LOADED" in status.stdout, status.stdout

        from mesh import demo

        outside = demo.save(demo.linear_model(11), tmp_path / "outside.onnx")
        refused = mesh_cmd("register", "outside", str(outside), "--router", router)
        assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr, refused.stderr
        assert "--file-root" in refused.stderr and str(tmp_path) not in refused.stderr.split("refused:")[1]
        (tmp_path / "mine").mkdir()
        model = demo.save(demo.linear_model(11), tmp_path / "mine" / "mine.onnx")  # under --file-root
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

        # Tokens: create one for a tenant (printed once), list (no secret), use it, revoke it.
        # The default tenant's (the demo models'): a tenant token reaches its own tenant's models.
        made = mesh_cmd("token", "create", "--name", "ci", "--expires", "30d", "--router", router)
        assert made.returncode == 0, made.stderr
        secret = made.stdout.strip()
        assert secret.startswith("msh_") and "shown only this once" in made.stderr
        listed = mesh_cmd("token", "list", "--router", router)
        assert listed.returncode == 0 and "\nci " in listed.stdout and " tenant " in listed.stdout, listed.stdout
        assert secret not in listed.stdout and "bootstrap-admin" in listed.stdout
        as_tenant = {**os.environ, "MESH_TOKEN": secret}
        assert mesh_cmd("infer", "demo-linear-a", "--router", router, env=as_tenant).returncode == 0
        denied = mesh_cmd("token", "list", "--router", router, env=as_tenant)
        assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr, denied.stderr
        assert mesh_cmd("token", "revoke", "ci", "--router", router).returncode == 0
        after = mesh_cmd("list", "--router", router, env=as_tenant)
        assert after.returncode == 1 and "UNAUTHENTICATED" in after.stderr, after.stderr
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
