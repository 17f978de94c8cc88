"""Cache-miss latency: time to first response for a model already on the pod's disk, against
onnxruntime's own session creation + first run of the same file, measured in the same run.

    python bench/miss.py [--models 12] [--room 3] [--rounds 4] [--weight-mib 8] [--redis]
                         [--env MESH_PLACEMENT_DIRECT_LOAD=false ...]

One runtime pod with room for `--room` of `--models` equally sized models (sized from one
measured load); requests go through the router with tritonclient, one at a time, cycling over
the models, so every request after the first round is a miss for a model whose artifact is in
the pod's disk cache (the eviction of the oldest model is on the path, as in a full pod).
Round 1 pulls every artifact (file:// copy into the cache) and is reported apart. The baseline
is `ort.InferenceSession(path)` + one `run` in this process with the pod's session options.
Also checks that no artifact is pulled twice (the pod's artifact-miss counter = models).
`--env` passes settings to every process of the mesh (e.g. MESH_PLACEMENT_DIRECT_LOAD=false
for the etcd-only miss path), `--redis` runs it with router telemetry. The machine's load
average is printed with the figures: on a shared box they move with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

import common  # noqa: F401 - puts the repository on sys.path
import numpy as np

from mesh import demo, types  # noqa: E402
from mesh.cli.local import LocalMesh  # noqa: E402
from mesh.kv.etcd import EtcdClient  # noqa: E402
from mesh.kv.keys import Keys  # noqa: E402

MiB = 1 << 20


def baseline_ms(paths: list[pathlib.Path], repeat: int) -> list[float]:
    """onnxruntime session creation + first run per file, the pod's options (1 intra-op thread)."""
    import onnxruntime as ort

    x = np.ones((1, 4), np.float32)
    out = []
    for _ in range(repeat):
        for path in paths:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            start = time.perf_counter()
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            session.run(None, {"input": x})
            out.append((time.perf_counter() - start) * 1000)
            del session
    return out


class Timeline:
    """Watches the mesh's etcd root from a thread and stamps each change on arrival
    (perf_counter), to split a miss into phases: (key, state) -> first arrival time."""

    def __init__(self, etcd: str, root: str) -> None:
        self.etcd, self.keys = etcd, Keys(root)
        self.seen: dict[tuple[str, str], float] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._watch())
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass

    async def _watch(self) -> None:
        client = EtcdClient([self.etcd], timeout=5)
        try:
            _, revision = await client.get_prefix(self.keys.prefix())
            self._ready.set()
            async for batch in client.watch_prefix(self.keys.prefix(), revision + 1):
                now = time.perf_counter()
                for ev in batch.events:
                    if ev.value is None:
                        continue
                    if ev.key.startswith(self.keys.prefix("assignments")):
                        self.seen.setdefault((ev.key.rsplit("/", 1)[-1], "assigned"), now)
                    elif ev.key.startswith(self.keys.prefix("copies")):
                        record = types.decode(types.CopyRecord, ev.value)
                        self.seen.setdefault((record.model_id, record.state.name), now)
        finally:
            await client.close()

    def forget(self, model_id: str) -> None:
        for state in ("assigned", "LOADING", "LOADED"):
            self.seen.pop((model_id, state), None)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=12)
    ap.add_argument("--room", type=int, default=3, help="models that fit on the pod at once")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--weight-mib", type=float, default=8.0)
    ap.add_argument("--redis", action="store_true", help="run with router telemetry (a Redis child)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for every mesh process (repeatable)")
    args = ap.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    import tritonclient.grpc as triton

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        weight = int(args.weight_mib * MiB)
        paths = [demo.save(demo.linear_model(i, weight_bytes=weight), folder / f"m{i}.onnx") for i in range(args.models)]
        x = triton.InferInput("input", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))

        # One measured load sizes the pod: room for `--room` models, not one more.
        probe = LocalMesh(state_dir=folder / "probe", pods=1, capacity="4GiB", allow_anonymous=True).start(timeout=90)
        try:
            probe.register("probe", paths[0])
            client = triton.InferenceServerClient(probe.router_address)
            client.infer("probe", [x], client_timeout=60)
            client.close()
            size = probe.get_model("probe").size_bytes
        finally:
            probe.stop()
        capacity = int(size * (args.room + 0.5))
        print(f"{args.models} models of {args.weight_mib:g} MiB weights, measured footprint {size / MiB:.1f} MiB; "
              f"pod capacity {capacity / MiB:.1f} MiB (room for {args.room})")

        mesh = LocalMesh(state_dir=folder / "mesh", pods=1, capacity=str(capacity), env=env,
                         redis=args.redis, allow_anonymous=True).start(timeout=90)
        try:
            for i, path in enumerate(paths):
                mesh.register(f"m{i}", path)
            client = triton.InferenceServerClient(mesh.router_address)
            timeline = Timeline(mesh.etcd, mesh.root)
            rounds: list[list[float]] = []
            phases: list[tuple[float, float, float]] = []
            loading_seen = 0
            errors = 0
            before = mesh.scrape("router")
            for r in range(args.rounds):
                lat = []
                for i in range(args.models):
                    timeline.forget(f"m{i}")
                    start = time.perf_counter()
                    try:
                        client.infer(f"m{i}", [x], client_timeout=60)
                    except Exception as exc:  # noqa: BLE001 - counted and shown, not fatal
                        errors += 1
                        print(f"  m{i}: {exc}")
                        continue
                    end = time.perf_counter()
                    lat.append((end - start) * 1000)
                    a, c = (timeline.seen.get((f"m{i}", s)) for s in ("assigned", "LOADED"))
                    if r > 0 and a and c:
                        phases.append(((a - start) * 1000, (c - a) * 1000, (end - c) * 1000))
                        # A pod writes LOADING only for a load that outlasts
                        # MESH_RUNTIME_LOADING_RECORD_HOLD_S (0: every load).
                        loading_seen += (f"m{i}", "LOADING") in timeline.seen
                rounds.append(lat)
            after = mesh.scrape("router")
            pod = mesh.scrape("pod-0")
            client.close()
            timeline.stop()
        finally:
            mesh.stop()
            if os.environ.get("MISS_KEEP_LOGS"):
                import shutil
                shutil.copytree(folder / "mesh", os.environ["MISS_KEEP_LOGS"], dirs_exist_ok=True)
        base = baseline_ms(paths, 3)  # after the mesh stopped: the same idle machine
    load_avg = os.getloadavg()

    hits = after.get('mesh_cache_hits_total{service="router"}', 0) - before.get('mesh_cache_hits_total{service="router"}', 0)
    misses = after.get('mesh_cache_misses_total{service="router"}', 0) - before.get('mesh_cache_misses_total{service="router"}', 0)
    router_miss_ms = ((after.get('mesh_cache_miss_seconds_sum{service="router"}', 0)
                       - before.get('mesh_cache_miss_seconds_sum{service="router"}', 0)) / max(misses, 1) * 1000)
    pulls = pod.get('mesh_cache_misses_total{service="runtime"}', 0)
    loads = pod.get("mesh_load_seconds_count", 0)
    load_ms = pod.get("mesh_load_seconds_sum", 0) / max(loads, 1) * 1000
    cached = [v for r in rounds[1:] for v in r]
    print(f"router: {misses:.0f} misses, {hits:.0f} hits, {errors} failed; pod: {pulls:.0f} artifact pulls "
          f"for {args.models} models ({'none' if pulls <= args.models else 'SOME'} pulled twice), "
          f"{loads:.0f} loads, mean pod load (session + warm-up + measurement) {load_ms:.1f} ms")
    print(f"first round (pull + load):      p50 {statistics.median(rounds[0]):7.1f} ms  p99 {pct(rounds[0], 0.99):7.1f} ms")
    print(f"miss, artifact on disk:         p50 {statistics.median(cached):7.1f} ms  p99 {pct(cached, 0.99):7.1f} ms  "
          f"({len(cached)} requests)")
    print(f"onnxruntime create + first run: p50 {statistics.median(base):7.1f} ms  p99 {pct(base, 0.99):7.1f} ms")
    print(f"router's own miss time (miss seen -> ready copy in its table), mean: {router_miss_ms:.1f} ms")
    if phases:
        # The response may come before the LOADED record reaches etcd (placement's direct
        # Load answers as the copy serves): the last phase is then negative.
        names = ("request -> assignment written", "assignment -> copy LOADED in etcd", "LOADED in etcd -> response")
        print(f"miss phases (medians, as seen by an etcd watch in this process; {loading_seen} of "
              f"{len(phases)} loads showed a LOADING record):")
        for k, name in enumerate(names):
            print(f"  {name:<32} {statistics.median(p[k] for p in phases):+7.1f} ms")
    print(f"miss minus onnxruntime (p50):   {statistics.median(cached) - statistics.median(base):+7.1f} ms   "
          f"ratio {statistics.median(cached) / statistics.median(base):.2f}x")
    print(f"load average at the end (1/5/15 min): {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}; "
          f"settings: {' '.join(args.env) or 'defaults'}{' +redis' if args.redis else ''}")


if __name__ == "__main__":
    sys.exit(main())
