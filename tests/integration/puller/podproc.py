"""A runtime pod as a child process (`python -m puller.main`) for the pod's integration tests:
the pod imports our inference protos and the tests use tritonclient's, which cannot share one
process. Stopped by its own PID."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import uuid

from mesh.cli import procs
from mesh.kv.keys import Keys

WAIT_S = 30.0


class Pod:
    def __init__(self, proc: subprocess.Popen, name: str, address: str, keys: Keys, folder: pathlib.Path) -> None:
        self.proc, self.name, self.address, self.keys, self.folder = proc, name, address, keys, folder

    def log(self) -> str:
        return (self.folder / "runtime.log").read_text(errors="replace")


def start_runtime(etcd_endpoint: str, base: pathlib.Path, lease_ttl_s: int, **settings: str) -> Pod:
    """A pod with its own instance id and key root; `settings` are MESH_RUNTIME_* values."""
    port = procs.free_port()
    name = f"pod-{uuid.uuid4().hex[:6]}"
    root = f"/test-{uuid.uuid4().hex[:12]}"
    folder = base / name
    folder.mkdir(parents=True)
    env = {
        **os.environ,
        "MESH_ETCD_ENDPOINTS": etcd_endpoint,
        "MESH_ROOT": root,
        "MESH_LEASE_TTL_S": str(lease_ttl_s),
        "MESH_RUNTIME_LISTEN": f"127.0.0.1:{port}",
        "MESH_RUNTIME_INSTANCE_ID": name,
        "MESH_RUNTIME_CACHE_DIR": str(folder / "cache"),
        "MESH_RUNTIME_USE_GPU": "never",
        "MESH_RUNTIME_FILE_ROOTS": os.path.realpath(tempfile.gettempdir()),  # the tests' models
        "PYTHONUNBUFFERED": "1",
        **{f"MESH_RUNTIME_{k.upper()}": v for k, v in settings.items()},
    }
    with open(folder / "runtime.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "puller.main"], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        procs.wait_port("127.0.0.1", port, WAIT_S, proc)
    except BaseException:
        procs.stop(proc)
        raise
    return Pod(proc, name, f"127.0.0.1:{port}", Keys(root), folder)
