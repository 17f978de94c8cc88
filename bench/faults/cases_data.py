"""Artifact, disk and load faults: F17 bad artifact server, F18 pod killed mid-download, F19
disk full, F21 overload 3×, F22 cold-miss herd, F23 soak with cancellations."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import pathlib
import random
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from bench.faults import observe, report
from bench.faults.cases import case
from bench.faults.cases_etcd import _counter
from bench.faults.cases_procs import registered_since
from bench.faults.harness import Run, Scenario, golden_model
from mesh.cli import procs
from mesh.pb.v1 import types_pb2

FAILED = types_pb2.MODEL_FAILED


def _stub(run: Run, folder: pathlib.Path) -> str:
    port = procs.free_port()
    run.spawn([sys.executable, "-m", "bench.faults.stub", "--port", str(port), "--dir", str(folder)], "stub", port)
    return f"http://127.0.0.1:{port}"


def _stub_stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/_stats", timeout=5) as resp:
        return json.loads(resp.read())


def cache_audit(run: Run) -> dict[str, int]:
    """Every pod's artifact cache: complete entries whose sha256 is wrong, files left in tmp/."""
    bad = tmp = entries = 0
    for cache in (run.mesh.state_dir / "cache").glob("pod-*"):
        for obj in (cache / "objects").glob("*/model.onnx"):
            entries += 1
            key = obj.parent.name
            # An entry is keyed by its registered sha256 (or by the URI's hash when none was
            # given, which says nothing about the bytes): only the former can be checked.
            if key in run.shas and hashlib.sha256(obj.read_bytes()).hexdigest() != key:
                bad += 1
        tmp += sum(1 for p in (cache / "tmp").rglob("*") if p.is_file()) if (cache / "tmp").exists() else 0
    return {"entries": entries, "bad_sha": bad, "tmp_files": tmp}


# F17: mode -> (registered sha256 is the true one, words the FAILED reason must contain)
BAD_MODES = {
    "stall": (True, ("longer than",)),
    "truncated": (True, ("sha256", "incomplete", "peer closed", "failed")),
    "badsha": (False, ("sha256",)),
    "status500": (True, ("HTTP 500",)),
    "drip": (True, ("longer than",)),
    "huge": (True, ("over the limit",)),
}


@case("F17", "Bad artifact server", "models whose URIs point at a local stub that stalls, "
      "truncates, serves the wrong bytes for the sha256, answers 500, drips 1 B/s, or declares a "
      "10 TB Content-Length (download timeout 5 s)",
      "load FAILED with the reason in its status; no partial file in the cache; retries bounded; "
      "the hot models keep serving", scenario=lambda: Scenario(env={"MESH_RUNTIME_DOWNLOAD_TIMEOUT_S": "5"}))
def f17(run: Run) -> None:
    folder = run.dir / "served"
    # One file per mode: the cache is content-addressed, so equal sha256s would share a download.
    files = {mode: golden_model(f"bad-{mode}", folder / f"bad-{mode}.onnx", 30 + i)
             for i, mode in enumerate(BAD_MODES)}
    shas = {mode: hashlib.sha256((folder / f"bad-{mode}.onnx").read_bytes()).hexdigest() for mode in BAD_MODES}
    run.shas = set(shas.values())
    base = _stub(run, folder)
    run.begin_fault()
    for mode, (honest, _) in BAD_MODES.items():
        run.register(f"bad-{mode}", f"{base}/{mode}/bad-{mode}.onnx", sha256=shas[mode] if honest else "0" * 64)

    def attempt(mode: str) -> tuple[str, str]:
        return mode, run.infer_code(files[mode], timeout=20)

    with concurrent.futures.ThreadPoolExecutor(len(BAD_MODES)) as pool:
        codes = dict(pool.map(attempt, BAD_MODES))
    run.sleep(2)
    stats = _stub_stats(base)["requests"]
    results = {}
    for mode, (_, words) in BAD_MODES.items():
        status = run.get_model(f"bad-{mode}")
        reason = status.last_error or "; ".join(c.error for c in status.copies if c.error)
        results[mode] = {"code": codes[mode], "failed": status.state == FAILED or bool(reason),
                         "reason_ok": any(w.lower() in reason.lower() for w in words),
                         "reason": reason[:160], "fetches": stats.get(f"/{mode}/bad-{mode}.onnx", 0)}
    run.end_fault()
    run.figures["modes"] = results
    run.figures["reasons_ok"] = sum(r["reason_ok"] for r in results.values())
    run.figures["max_fetches"] = max(r["fetches"] for r in results.values())
    run.figures["cache"] = cache_audit(run)
    run.close_during()


@case("F18", "Puller crash mid-download", "a 4 MiB model served at 400 kB/s; kill -9 the pod "
      "downloading it part-way, restart it (same cache dir)",
      "no artifact served unless its sha256 verified; temp files swept; the model is served "
      "correctly afterwards")
def f18(run: Run) -> None:
    folder = run.dir / "served"
    big = golden_model("big", folder / "big.onnx", 8, weight_bytes=4 * 1024 * 1024)
    sha = hashlib.sha256((folder / "big.onnx").read_bytes()).hexdigest()
    run.shas = {sha}
    base = _stub(run, folder)
    path = "/slow/big.onnx"
    run.register("big", f"{base}{path}?bps=400000", sha256=sha)
    run.begin_fault(recovery_from="fault_end")
    first = threading.Thread(target=run.infer_code, args=(big,), kwargs={"timeout": 15}, daemon=True)
    first.start()
    size = (folder / "big.onnx").stat().st_size
    run.wait_until(lambda: _stub_stats(base)["bytes"].get(path, 0) > size * 0.3, 30, "download never started")
    victim = next((p.name for p in (run.mesh.state_dir / "cache").glob("pod-*")
                   if any((p / "tmp").rglob("*"))), "pod-0")
    run.figures["victim"] = victim
    run.kill9(victim)
    run.figures["tmp_files_after_kill"] = cache_audit(run)["tmp_files"]
    since = time.time()
    run.restart(victim)
    run.wait_until(lambda: registered_since(run, victim, since), 60, "pod never came back")
    run.figures["tmp_files_after_restart"] = sum(
        1 for p in (run.mesh.state_dir / "cache" / victim / "tmp").rglob("*") if p.is_file())
    run.end_fault()
    answers = run.checked([big], deadline_s=60)
    run.figures["served_after"] = answers[0][1]
    run.figures["corrupt_serves"] = sum(1 for a in answers if a[1] == "WRONG")
    run.figures["cache"] = cache_audit(run)
    run.figures["fetches"] = _stub_stats(base)["requests"].get(path, 0)
    first.join(20)
    run.close_during()


def _tmpfs(run: Run) -> None:
    """The only pod's cache on an 8 MiB tmpfs (needs root); unmounted after the mesh stops."""
    mnt = run.dir / "tmpfs"
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    run.cleanups.append(lambda: subprocess.run(["umount", str(mnt)], check=False))
    run.scenario.pod_env[0] = {"MESH_RUNTIME_CACHE_DIR": str(mnt / "cache")}
    run.tmpfs = mnt


@case("F19", "Disk full", "the pod's artifact cache on an 8 MiB tmpfs; three 3 MiB models, then "
      "a 10 MiB one, asked for in turn", "FAILED with ENOSPC for what cannot fit, eviction tried, "
      "process alive (0 crashes)", prepare=_tmpfs,
      scenario=lambda: Scenario(pods=1, two_copy=False, singles=1))
def f19(run: Run) -> None:
    pid = run.pid("pod-0")
    sizes = {"disk-3m-a": 3, "disk-3m-b": 3, "disk-3m-c": 3, "disk-10m": 10}
    models = {m: golden_model(m, run.models_dir / f"{m}.onnx", 20 + i, weight_bytes=mib * 1024 * 1024)
              for i, (m, mib) in enumerate(sizes.items())}
    evict0 = _counter(run, ["pod-0"], "mesh_artifact_evictions_total")
    run.begin_fault()
    codes = {}
    for model_id, model in models.items():
        run.register(model_id, run.models_dir / f"{model_id}.onnx")
        codes[model_id] = run.infer_code(model, timeout=30)
    run.end_fault()
    status = run.get_model("disk-10m")
    reason = status.last_error or "; ".join(c.error for c in status.copies if c.error)
    run.figures["codes"] = codes
    run.figures["disk_10m_reason"] = reason[:160]
    run.figures["enospc_reported"] = "space" in reason.lower() or "enospc" in reason.lower()
    run.figures["evictions"] = _counter(run, ["pod-0"], "mesh_artifact_evictions_total") - evict0
    run.figures["crashes"] = int(run.mesh.procs["pod-0"].poll() is not None or run.pid("pod-0") != pid)
    run.close_during()


@case("F21", "Overload 3× capacity", "measure peak (64 in flight, unpaced, 5 s), then offer 3 × "
      "peak with up to 512 in flight", "excess shed as RESOURCE_EXHAUSTED in < 5 ms; goodput ≥ 90 % "
      "of peak; admitted p99 ≤ 2× baseline; no OOM", scenario=lambda: Scenario(max_inflight=512))
def f21(run: Run) -> None:
    base_rate = run.opts.rate
    run.set_inflight(64)
    ok0, probe0 = _router_ok(run), time.monotonic()
    run.set_rate(100000)  # unpaced: as fast as 64 requests in flight go
    run.sleep(5)
    ok1, probe1 = _router_ok(run), time.monotonic()
    run.set_inflight(64)
    run.set_rate(base_rate)
    run.sleep(2)
    # The validity gate and the baseline p99 are the paced phase after the probe.
    run.marks["measure_start"] = time.monotonic()
    run.sleep(run.opts.before_s)
    live_peak = (ok1 - ok0) / (probe1 - probe0)
    run.begin_fault()
    shed0 = _router_shed(run)
    run.set_inflight(512)
    run.set_rate(3 * max(live_peak, base_rate))
    run.sleep(6 if run.opts.quick else 15)
    run.set_inflight(64)
    run.set_rate(base_rate)
    run.end_fault()
    fast, total = (b - a for a, b in zip(shed0, _router_shed(run), strict=True))
    # The routers' own time for the sheds (Envoy's from a request's first byte to its answer;
    # Python's from its handler's start): the client's figures add the client's own wait.
    run.figures["router_shed"] = int(total)
    run.figures["router_shed_within_5ms_pct"] = round(100 * fast / total, 1) if total else None
    run.figures["offered_overload_rps"] = round(3 * max(live_peak, base_rate), 1)
    run.post.append(lambda row, rows: _overload_figures(run, rows, probe0, probe1))
    run.close_during()


def _router_ok(run: Run) -> float:
    """ModelInfer requests the routers answered OK so far (their counters)."""
    total = 0.0
    for name in [n for n in run.mesh.procs if n.startswith("router")]:
        samples = run.mesh.scrape(name)
        total += sum(v for k, v in samples.items() if k.startswith("mesh_requests_total{")
                     and 'code="OK"' in k and "ModelInfer" in k)
    return total


def _router_shed(run: Run) -> tuple[float, float]:
    """(within 5 ms, all) of the ModelInfer answers RESOURCE_EXHAUSTED the routers timed so far
    (modelmesh_api_request_milliseconds, Envoy's answers included)."""
    fast = total = 0.0
    for name in [n for n in run.mesh.procs if n.startswith("router")]:
        for key, value in run.mesh.scrape(name).items():
            if not key.startswith("modelmesh_api_request_milliseconds_") or 'code="RESOURCE_EXHAUSTED"' not in key:
                continue
            if key.startswith("modelmesh_api_request_milliseconds_bucket") and 'le="5.0"' in key:
                fast += value
            elif key.startswith("modelmesh_api_request_milliseconds_count"):
                total += value
    return fast, total


def _overload_figures(run: Run, rows: list, p0: float, p1: float) -> None:
    probe = [r for r in rows if p0 + 1 <= r[0] < p1]  # first second: ramp up
    peak = sum(1 for r in probe if r[5] == "OK") / max(p1 - p0 - 1, 1e-9)
    t0, t1 = run.marks["fault_start"], run.marks["fault_end"]
    over = [r for r in rows if t0 <= r[0] < t1]
    shed = [(r[1] - r[0]) * 1000 for r in over if r[5] == "RESOURCE_EXHAUSTED"]
    ok = [(r[1] - r[0]) * 1000 for r in over if r[5] == "OK"]
    base = [(r[1] - r[0]) * 1000 for r in rows if run.marks["measure_start"] <= r[0] < t0 and r[5] == "OK"]
    goodput = len(ok) / max(t1 - t0, 1e-9)
    run.figures.update(
        peak_rps=round(peak, 1), sent_overload_rps=round(len(over) / max(t1 - t0, 1e-9), 1),
        goodput_rps=round(goodput, 1), goodput_pct_of_peak=round(100 * goodput / peak, 1) if peak else None,
        shed=len(shed), shed_p50_ms=_round(report.percentile(shed, 0.5)),
        shed_p99_ms=_round(report.percentile(shed, 0.99)), admitted_p99_ms=_round(report.percentile(ok, 0.99)),
        baseline_p99_ms=_round(report.percentile(base, 0.99)))


@case("F22", "Cold-miss herd", "200 concurrent first requests over 50 cold models (--quick: 80 over 20)",
      "exactly one pull and one load per model (single-flight)")
def f22(run: Run) -> None:
    n = 20 if run.opts.quick else 50
    cold = [golden_model(f"cold-{i}", run.models_dir / f"cold-{i}.onnx", 100 + i) for i in range(n)]
    for m in cold:
        run.register(m.model_id, run.models_dir / f"{m.model_id}.onnx")
    pods = [p for p in run.mesh.procs if p.startswith("pod-")]
    pulls0 = _counter(run, pods, 'mesh_cache_misses_total{service="runtime"}')
    herd = [m for m in cold for _ in range(4)]
    random.Random(0).shuffle(herd)
    run.begin_fault()
    answers = run.checked(herd, deadline_s=60)
    run.end_fault()
    lat = [a[2] * 1000 for a in answers]
    codes: dict[str, int] = {}
    for a in answers:
        codes[a[1]] = codes.get(a[1], 0) + 1
    run.figures.update(requests=len(herd), models=n, codes=codes, p50_ms=_round(report.percentile(lat, 0.5)),
                       p99_ms=_round(report.percentile(lat, 0.99)),
                       pulls=_counter(run, pods, 'mesh_cache_misses_total{service="runtime"}') - pulls0)
    run.close_during()

    def loads(row: dict, rows: list) -> None:
        per = (row.get("loads") or {}).get("per_model", {})
        counts = [per.get(m.model_id, {}).get("loads", 0) for m in cold]
        run.figures["cold_loads_per_model"] = {"min": min(counts), "max": max(counts),
                                               "not_one": sum(1 for c in counts if c != 1)}

    run.post.append(loads)


@case("F23", "Soak with cancellations", "--soak-minutes (default 30; --quick 1) of load, 30 % "
      "streaming, 20 % of requests cancelled by the client", "RSS growth < 5 % after warm-up; fds "
      "and tasks flat", scenario=lambda: Scenario(cancel_fraction=0.2, stream_fraction=0.3))
def f23(run: Run) -> None:
    seconds = run.opts.soak_minutes * 60
    series: dict[str, list[tuple[float, dict[str, int]]]] = {}
    run.begin_fault()
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        now = time.monotonic() - start
        for name, fig in observe.sample(run.mesh).items():
            series.setdefault(name, []).append((now, fig))
        run.sleep(min(10.0, max(0.0, seconds - (time.monotonic() - start))))
    run.end_fault()
    run.close_during()
    warm = seconds * 0.2
    out = {}
    for name, points in series.items():
        pts = [(t, f) for t, f in points if t >= warm and f["pid"] == points[-1][1]["pid"]]
        if len(pts) < 2:
            continue
        rss0, rss1 = pts[0][1]["rss_kb"], pts[-1][1]["rss_kb"]
        out[name] = {
            "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2) if rss0 else None,
            "rss_kb_per_min": _round(observe.slope_per_min([(t, f["rss_kb"]) for t, f in pts])),
            "fds_per_min": _round(observe.slope_per_min([(t, f["fds"]) for t, f in pts])),
            "tasks_per_min": _round(observe.slope_per_min([(t, f["tasks"]) for t, f in pts if "tasks" in f])),
        }
    run.figures["soak_s"] = round(seconds)

    def cancelled(row: dict, rows: list) -> None:
        # 20 % are sent with a cancel timer (0.2-5 ms); those answered sooner are not cancelled.
        during = row["phases"]["during"]
        sent = during["requests"] + during["client_cancelled"]
        run.figures["cancelled_pct"] = round(100 * during["client_cancelled"] / sent, 1) if sent else None
        run.figures["streaming_pct"] = round(100 * sum(1 for r in rows if r[4] == "stream") / len(rows), 1)

    run.post.append(cancelled)
    run.figures["after_warmup"] = out
    growth = [v["rss_growth_pct"] for v in out.values() if v["rss_growth_pct"] is not None]
    run.figures["max_rss_growth_pct"] = max(growth) if growth else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
