"""Safe-update figures (issue 13): traffic split error, requests failed during a switch, and the
time from a failing (or slow) candidate's first errors to its rollback.

    python bench/rollouts.py [--requests 2000] [--clients 4]

A real mesh on loopback (LocalMesh: etcd, Redis, 2 placement replicas, 2 pods, 2 routers),
tritonclient.grpc clients in threads, one request at a time each (closed loop), spread over
both routers. Every figure is from the clients' side except `judged`, the leader's own
(detected_unix_ms - the start of the first second with candidate errors, from the record):

- split: a 70/30 vmodel, --requests requests; the observed share of the 70 target, its error
  in points, and the binomial standard deviation for that many requests (the error to expect
  from chance alone);
- switch: SetVModel to a cold target under load; requests failed (the target is 0);
- rollback: a rollout (steps 10,50,100, dwell 60 s, max error rate 0.05, min requests 5) to a
  model that refuses every request (another input width); from the first failed request the
  clients saw to the rollback's write as the clients see it (the last failure), the failed
  requests and their share of the requests sent meanwhile;
- slow: the same to a model that answers ~20x slower (a matrix product over a 128 MB weight),
  --max-p99-ratio 1.5, dwell 3 s: time from the start to the rollback, and its reason.
Bounded: each phase stops by itself (the rollouts within 90 s).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tritonclient.grpc as triton  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from mesh import demo  # noqa: E402
from mesh.cli.local import LocalMesh  # noqa: E402
from mesh.pb.v1 import vmodels_pb2, vmodels_pb2_grpc  # noqa: E402

X = np.ones((1, 4), dtype=np.float32)


class Load:
    """`clients` closed-loop clients over the routers until stopped (or `limit` requests)."""

    def __init__(self, mesh: LocalMesh, name: str, clients: int, limit: int = 0) -> None:
        self.name, self.limit = name, limit
        self.clients = [triton.InferenceServerClient(mesh.router_addresses[i % len(mesh.router_addresses)])
                        for i in range(clients)]
        self.answers: list[tuple[float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c,)) for c in self.clients]

    def _run(self, client: triton.InferenceServerClient) -> None:
        inp = triton.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        while not self.stop.is_set():
            if self.limit and len(self.answers) + len(self.failures) >= self.limit:
                return
            try:
                got = client.infer(self.name, [inp], client_timeout=30)
                self.answers.append((time.time(), got.get_response().model_name))
            except InferenceServerException as exc:
                self.failures.append((time.time(), str(exc)))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        for c in self.clients:
            c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests for the split (default 2000)")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop clients (default 4)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rollouts-") as tmp:
        base = pathlib.Path(tmp)
        mesh = LocalMesh(state_dir=base / "mesh", pods=2, routers=2, placements=2, capacity="512MiB", redis=True,
                         lease_ttl_s=3, allow_anonymous=True).start(timeout=120)
        try:
            run(mesh, base, args)
        finally:
            mesh.stop()


def run(mesh: LocalMesh, base: pathlib.Path, args: argparse.Namespace) -> None:
    for i in range(4):
        mesh.register(f"m{i}", demo.save(demo.linear_model(i), base / f"m{i}.onnx"))
    mesh.register("wider", demo.save(demo.linear_model(9, in_features=5), base / "wider.onnx"))
    mesh.register("slow", demo.save(demo.linear_model(10, weight_bytes=128 << 20), base / "slow.onnx"))
    md = mesh.auth_metadata
    with mesh.router_channel() as channel:
        stub = vmodels_pb2_grpc.VModelsStub(channel)

        def set_vmodel(name: str, targets: dict[str, int]) -> None:
            spec = vmodels_pb2.VModelSpec(name=name, targets=[vmodels_pb2.VModelTarget(model_id=m, weight=w)
                                                              for m, w in targets.items()])
            stub.SetVModel(vmodels_pb2.SetVModelRequest(spec=spec), timeout=90, metadata=md)

        def rollout(name: str, candidate: str, steps: list[int], dwell_s: float, **bounds: float) -> tuple:
            spec = vmodels_pb2.RolloutSpec(vmodel=name, candidate=candidate, steps=steps, dwell_s=dwell_s, **bounds)
            stub.StartRollout(vmodels_pb2.StartRolloutRequest(spec=spec), timeout=90, metadata=md)
            started = time.time()
            end = time.monotonic() + 90
            while time.monotonic() < end:
                status = stub.GetVModel(vmodels_pb2.GetVModelRequest(name=name), timeout=10, metadata=md)
                if status.rollout.state != "running":
                    return started, time.time(), status.rollout
                time.sleep(0.1)
            raise SystemExit(f"rollout of {name} did not end within 90 s")

        # split
        set_vmodel("split", {"m0": 70, "m1": 30})
        with Load(mesh, "split", args.clients, limit=args.requests) as load:
            for t in load.threads:
                t.join()
        n = len(load.answers)
        share = sum(1 for _, m in load.answers if m == "m0") / max(n, 1)
        sd = math.sqrt(0.7 * 0.3 / max(n, 1))
        print(f"split 70/30 over {n} requests ({len(load.failures)} failed): m0 took {share:.2%}, error "
              f"{(share - 0.7) * 100:+.2f} points (binomial sd {sd * 100:.2f} points)")

        # switch
        set_vmodel("sw", {"m2": 1})
        with Load(mesh, "sw", args.clients) as load:
            time.sleep(1.0)
            t0 = time.time()
            set_vmodel("sw", {"m3": 1})
            switch_s = time.time() - t0
            time.sleep(1.0)
        print(f"switch to a cold target under load: {len(load.failures)} of {len(load.answers) + len(load.failures)} "
              f"requests failed; SetVModel took {switch_s:.2f}s (the load included)")

        # rollback on errors
        set_vmodel("ro", {"m0": 1})
        with Load(mesh, "ro", args.clients) as load:
            time.sleep(1.0)
            started, ended, ro = rollout("ro", "wider", [10, 50, 100], 60.0, max_error_rate=0.05, min_requests=5)
            time.sleep(2.0)
        fails = [t for t, _ in load.failures]
        sent = sum(1 for t, _ in load.answers if fails and fails[0] <= t <= fails[-1]) + len(fails)
        judged = ro.figures["detected_unix_ms"] - ro.figures["first_error_unix_ms"]
        print(f"failing candidate: {ro.state} ({ro.reason}); first client-seen error to the last "
              f"{(fails[-1] - fails[0]) if fails else 0:.2f}s, {len(fails)} failed of {sent} sent meanwhile; "
              f"judged {judged:.0f} ms after its first error's second began; start to rollback seen "
              f"{ended - started:.2f}s")
        assert not [t for t in fails if t > ended + 1.0], "failures after the rollback was visible"

        # rollback on p99
        set_vmodel("ro2", {"m1": 1})
        with Load(mesh, "ro2", args.clients) as load:
            time.sleep(1.0)
            started, ended, ro = rollout("ro2", "slow", [50, 100], 3.0, max_p99_ratio=1.5, min_requests=5)
        print(f"slow candidate: {ro.state} after {ended - started:.2f}s ({ro.reason}); "
              f"{len(load.failures)} requests failed")


if __name__ == "__main__":
    main()
