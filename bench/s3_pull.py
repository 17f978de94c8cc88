"""S3 pulls and bulk registration, against a same-run baseline.

    python bench/s3_pull.py [--mib 64] [--rounds 3] [--models 200] [--single 5]

Pull: one `--mib` object on moto's S3 server (a child process on 127.0.0.1), pulled `--rounds`
times into a fresh pod cache (puller/cache.py + puller/storage/s3.py: boto3 streamed in a
worker thread, MD5 against the ETag, atomic install) against a plain httpx streamed GET of
the same bytes from the same server to a file (a presigned URL, no checks), and boto3's own
get_object streamed to a file in this thread. Also a 4-file prefix of
the same total size (the folder path: objects fetched 4 at a time).

Registration: a LocalMesh (1 router, 1 placement, 1 pod, on its own etcd); `--models` specs in
one RegisterModels call against `--single` `mesh register` processes (each a CLI start, a
channel and one RegisterModel), extrapolated to `--models`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401 - puts the repository on sys.path
import httpx

from mesh.metrics import Metrics  # noqa: E402
from puller.cache import ArtifactCache  # noqa: E402
from puller.storage.s3 import S3Config, S3Provider  # noqa: E402
from tests.integration.s3server import ACCESS_KEY, REGION, SECRET_KEY, start_s3  # noqa: E402

MiB = 1 << 20


def pull_figures(base: pathlib.Path, mib: int, rounds: int) -> None:
    from mesh.cli import procs

    server = start_s3(base / "moto.log")
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        s3 = server.client()
        s3.create_bucket(Bucket="bench")
        data = os.urandom(mib * MiB)
        s3.put_object(Bucket="bench", Key="one/model.onnx", Body=data)
        quarter = len(data) // 4
        for i, name in enumerate(("model.onnx", "w1.bin", "w2.bin", "w3.bin")):
            s3.put_object(Bucket="bench", Key=f"four/{name}", Body=data[i * quarter:(i + 1) * quarter])
        provider = S3Provider(S3Config(endpoint_url=server.endpoint, region=REGION, addressing_style="path"))

        async def ours(uri: str, i: int) -> float:
            cache = ArtifactCache(base / f"cache-{uri[-4:-1]}-{i}", 1 << 34, {"s3": provider},  # type: ignore[dict-item]
                                  Metrics(service="runtime"))
            await cache.start()
            t = time.perf_counter()
            art = await cache.acquire(uri)
            seconds = time.perf_counter() - t
            assert art.size_bytes == len(data) - (len(data) % 4 if uri.endswith("/") else 0)
            cache.release(art.key)
            return seconds

        # The plain download: a presigned GET (signed here, no request) streamed by httpx to a file.
        url = s3.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": "one/model.onnx"},
                                        ExpiresIn=3600)

        def plain(i: int) -> float:
            t = time.perf_counter()
            n = 0
            with httpx.stream("GET", url, timeout=120) as resp, open(base / f"plain-{i}", "wb") as f:
                resp.raise_for_status()
                for chunk in resp.iter_bytes(MiB):
                    n += f.write(chunk)
            assert n == len(data)
            return time.perf_counter() - t

        def boto(i: int) -> float:
            t = time.perf_counter()
            n = 0
            body = s3.get_object(Bucket="bench", Key="one/model.onnx")["Body"]
            with open(base / f"boto-{i}", "wb") as f:
                for chunk in body.iter_chunks(MiB):
                    n += f.write(chunk)
            assert n == len(data)
            return time.perf_counter() - t

        rows = {"plain httpx GET": [plain(i) for i in range(rounds)],
                "plain boto3 get_object": [boto(i) for i in range(rounds)],
                "s3:// object (cache)": [asyncio.run(ours("s3://bench/one/model.onnx", i)) for i in range(rounds)],
                "s3:// prefix, 4 files (cache)": [asyncio.run(ours("s3://bench/four/", i)) for i in range(rounds)]}
        base_rate = mib / statistics.median(rows["plain httpx GET"])
        print(f"pull of {mib} MiB from moto's S3 server, median of {rounds} (load {os.getloadavg()[0]:.2f}):")
        for name, times in rows.items():
            rate = mib / statistics.median(times)
            print(f"  {name:32s} {statistics.median(times):6.3f} s  {rate:7.1f} MiB/s  x{rate / base_rate:.2f}")
    finally:
        procs.stop(server.proc)


def registration_figures(base: pathlib.Path, models: int, single: int) -> None:
    from mesh import demo
    from mesh.cli.local import LocalMesh
    from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2

    path = demo.save(demo.linear_model(1), base / "models" / "m.onnx")
    mesh = LocalMesh(state_dir=base / "mesh", pods=1, placements=1, file_roots=(str(base / "models"),)).start()
    try:
        specs = [types_pb2.ModelSpec(model_id=f"bulk-{i}", storage_uri=path.as_uri()) for i in range(models)]
        with mesh.router_channel() as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            t = time.perf_counter()
            resp = stub.RegisterModels(registry_pb2.RegisterModelsRequest(
                models=[registry_pb2.RegisterModelRequest(spec=s) for s in specs]), timeout=120,
                metadata=mesh.auth_metadata)
            bulk = time.perf_counter() - t
        assert all(r.code == 0 for r in resp.results), [r for r in resp.results if r.code][:3]
        env = {**os.environ, "MESH_TOKEN": mesh.token}
        times = []
        for i in range(single):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mesh.cli.main", "register", f"one-{i}", str(path), "--router",
                            mesh.router_address], check=True, capture_output=True, env=env, timeout=60)
            times.append(time.perf_counter() - t)
        each = statistics.median(times)
        print(f"registration of {models} models (load {os.getloadavg()[0]:.2f}):")
        print(f"  one RegisterModels call      {bulk:6.3f} s  {models / bulk:8.1f} models/s")
        print(f"  `mesh register` x{single} (median) {each:6.3f} s each  {1 / each:8.1f} models/s  "
              f"-> {models} models ~{each * models:.1f} s  (bulk x{each * models / bulk:.0f})")
    finally:
        mesh.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--single", type=int, default=5)
    ap.add_argument("--skip-registration", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pull_figures(pathlib.Path(tmp), args.mib, args.rounds)
        if not args.skip_registration:
            registration_figures(pathlib.Path(tmp), args.models, args.single)


if __name__ == "__main__":
    main()
