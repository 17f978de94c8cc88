"""A real S3-compatible server for the s3:// tests: moto's server mode as a child process on
127.0.0.1 (a free port), stopped by its own PID. Path-style addressing (no per-bucket DNS)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mesh.cli import procs

ACCESS_KEY = "meshtestkey"
SECRET_KEY = "meshtestsecret"
REGION = "us-east-1"


@dataclasses.dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(s3={"addressing_style": "path"}))

    def env(self) -> dict[str, str]:
        """What a pod (or the CLI) needs to reach it: the endpoint and the keys, from the
        environment as boto3's default chain reads them."""
        return {"MESH_RUNTIME_S3_ENDPOINT_URL": self.endpoint, "MESH_RUNTIME_S3_REGION": REGION,
                "MESH_RUNTIME_S3_ADDRESSING_STYLE": "path",
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_DEFAULT_REGION": REGION}

    def upload_folder(self, bucket: str, prefix: str, folder: pathlib.Path) -> None:
        s3 = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}")


def start_s3(log_path: pathlib.Path, timeout: float = 60.0, auth_after: int = -1) -> S3Server:
    """`auth_after` >= 0: moto enforces IAM from its (auth_after + 1)-th request on (moto's
    INITIAL_NO_AUTH_ACTION_COUNT), so a key of a user without a policy is denied."""
    port = procs.free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    if auth_after >= 0:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    log.close()
    procs.wait_or_stop(proc, port, timeout)
    return S3Server(f"http://127.0.0.1:{port}", proc)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield server
    finally:
        procs.stop(server.proc)
