"""Footprint measurement: attribution under concurrent loads (fake NVML, no GPU needed),
per-process vs device-wide readings, host PIDs through PID namespaces, MIG slices and
capacities; the host readings (resident growth, in-use heap less the arena reserve, transient
peak) on synthetic and real loads. The size ladder against onnxruntime alone is
test_footprint_ladder.py."""

from __future__ import annotations

import threading
import time
import types

import pytest

from mesh import demo
from puller import footprint
from puller.footprint import Footprint, NvmlProbe


class FakeNvml:
    """Two GPUs; GPU 1 in MIG mode with two slices. Memory per (handle, pid)."""

    def __init__(self, pid: int, per_process: bool = True) -> None:
        self.pid = pid
        self.per_process = per_process
        self.used: dict[str, dict[int, int]] = {"0": {}, "1": {}, "1/mig0": {}, "1/mig1": {}}
        self.lock = threading.Lock()

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return str(i)

    def nvmlDeviceGetMigMode(self, h: str) -> tuple[int, int]:
        return (1, 1) if h == "1" else (0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, h: str) -> int:
        return 2

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: str, j: int) -> str:
        return f"{h}/mig{j}"

    def nvmlDeviceGetName(self, h: str) -> bytes:
        return b"Fake MIG 1g.10gb" if "mig" in h else b"Fake H100"

    def nvmlDeviceGetMemoryInfo(self, h: str) -> types.SimpleNamespace:
        total = 10 << 30 if "mig" in h else 80 << 30
        with self.lock:
            used = sum(self.used[h].values()) + (1 << 30)  # the driver's own share
        return types.SimpleNamespace(total=total, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, h: str) -> list[types.SimpleNamespace]:
        if not self.per_process:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        with self.lock:
            return [types.SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self.used[h].items()]

    def allocate(self, h: str, pid: int, n: int) -> None:
        with self.lock:
            self.used[h][pid] = self.used[h].get(pid, 0) + n


def test_devices_lists_gpus_and_mig_slices_with_capacity_after_reserve() -> None:
    devs = footprint.devices(FakeNvml(pid=1), reserve=1 << 30)
    assert [d.index for d in devs] == ["0", "1/mig0", "1/mig1"]
    assert devs[0].capacity_bytes == (80 << 30) - (1 << 30)
    assert devs[1].total_bytes == 10 << 30 and devs[1].name == "Fake MIG 1g.10gb"
    assert devs[1].as_dict()["capacity_bytes"] == (9 << 30)


@pytest.mark.parametrize("per_process", [True, False])
def test_concurrent_loads_are_each_attributed_their_own_bytes(per_process: bool) -> None:
    """Several loads started at once: each figure is its own allocation, never the sum of
    overlapping ones (the measuring step is serialised)."""
    pid = 4242
    nvml = FakeNvml(pid, per_process=per_process)
    meter = Footprint(NvmlProbe(nvml, pid=pid, indices=["0"]))
    want = {f"m{i}": (i + 1) * (100 << 20) for i in range(6)}
    got: dict[str, int] = {}
    start = threading.Barrier(len(want))

    def load(model: str) -> None:
        def create() -> str:
            nvml.allocate("0", pid, want[model] // 2)  # session creation
            time.sleep(0.005)  # let the others try to interleave
            nvml.allocate("0", pid, want[model] - want[model] // 2)  # warm-up workspace
            return model

        start.wait(5)
        _, measured = meter.measure(create)
        got[model] = measured.bytes
        assert measured.method == ("nvml-pid" if per_process else "nvml-device-delta")

    threads = [threading.Thread(target=load, args=(m,)) for m in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == want


def test_other_processes_on_the_device_do_not_count() -> None:
    nvml = FakeNvml(pid=1)
    probe = NvmlProbe(nvml, pid=1, indices=["0"])
    meter = Footprint(probe)

    def create() -> None:
        nvml.allocate("0", 2, 5 << 30)  # another process grows meanwhile
        nvml.allocate("0", 1, 300 << 20)

    _, measured = meter.measure(create)
    assert (measured.bytes, measured.method) == (300 << 20, "nvml-pid")


def test_several_devices_sum() -> None:
    nvml = FakeNvml(pid=7)
    meter = Footprint(NvmlProbe(nvml, pid=7))

    def create() -> None:
        nvml.allocate("0", 7, 10 << 20)
        nvml.allocate("1/mig1", 7, 20 << 20)

    assert meter.measure(create)[1].bytes == 30 << 20


_MEASURE = """
import asyncio, sys
from puller.executor import Executor
from puller.footprint import Footprint, HostProbe
probe = HostProbe(heap=sys.argv[2] == "heap")
ex = Executor(1, 1, cuda=False, footprint=Footprint(probe))
model = asyncio.run(ex.load("big", sys.argv[1]))
print(",".join(probe.methods), model.measure_method, model.size_bytes)
"""


@pytest.mark.parametrize("heap", ["heap", "rss-only"])
def test_host_footprint_of_a_real_session_is_measured_not_the_file_size(tmp_path, repo_root, heap: str) -> None:
    """In a fresh interpreter: this test process's own heap history (sessions and threads of
    earlier tests) would decide which reading is the larger."""
    import subprocess
    import sys

    path = demo.save(demo.linear_model(3, weight_bytes=16 << 20), tmp_path / "big.onnx")
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), heap], capture_output=True, text=True,
                         timeout=120, cwd=repo_root)
    assert out.returncode == 0, out.stderr
    methods, method, size = out.stdout.split()
    assert methods == ("rss+peak,heap+peak" if heap == "heap" else "rss+peak")
    assert method in methods.split(",")
    # The weights live in the session: at least most of them are measured, and the figure is
    # a measurement (it does not equal the file size).
    assert int(size) >= 12 << 20
    assert int(size) != path.stat().st_size


# -- host readings ----------------------------------------------------------------------------

MiB = 1 << 20


def _reading(anon: int, chunks: int, mapped: int = 0, region: int = 0, rss: int = 0, hwm: int = 0):
    return footprint.HostReading(anon, rss, hwm, (chunks, mapped, region))


def _probe(reserve: int = MiB) -> footprint.HostProbe:
    probe = footprint.HostProbe()
    probe.arena_reserve = reserve
    return probe


def test_resident_growth_is_booked_when_the_load_added_fresh_memory() -> None:
    """A load that grew the process (weights plus the heap fragments it left) books that."""
    m = _probe().measured(_reading(0, 0), _reading(17 * MiB, 11 * MiB), new_session=True)
    assert (m.bytes, m.method) == (17 * MiB, "rss+peak")


def test_a_load_hidden_in_reused_memory_books_what_the_session_holds_less_the_arena_reserve() -> None:
    """Regression: resident growth alone books ~0 for a load that reuses memory an unload
    freed (glibc keeps it); the in-use heap does not, less onnxruntime's untouched arena chunk
    (which the heap-only figure booked: a 0.1 MB model at ~1.2 MiB)."""
    m = _probe().measured(_reading(0, 0), _reading(4096, MiB + (240 << 10)), new_session=True)
    assert (m.bytes, m.method) == (240 << 10, "heap+peak")
    # A run (no new session) has no arena chunk to discount.
    assert _probe().measured(_reading(0, 0), _reading(0, 2 * MiB), new_session=False).bytes == 2 * MiB


def test_untouched_mmapped_arena_regions_are_not_booked() -> None:
    """onnxruntime's arena sizes a region for one 256 MiB tensor at 512 MiB (mmapped, half of
    it never written): the part resident growth does not show is discounted once."""
    m = _probe().measured(_reading(0, 0), _reading(257 * MiB, MiB, mapped=512 * MiB), new_session=True)
    assert m.bytes == MiB + 257 * MiB  # heap chunks + the resident part of the region, not 513 MiB


def test_the_transient_peak_is_added_on_top() -> None:
    before = _reading(0, 0, rss=100 * MiB, hwm=100 * MiB)
    after = _reading(5 * MiB, 5 * MiB, rss=105 * MiB, hwm=169 * MiB)
    m = _probe(reserve=0).measured(before, after, new_session=True)
    assert (m.bytes, m.transient, m.steady) == (69 * MiB, 64 * MiB, 5 * MiB)


def test_a_real_transient_peak_is_measured() -> None:
    """A warm-up that builds and drops 64 MiB: resident at the peak only (VmHWM reset)."""
    import numpy as np

    meter = Footprint(footprint.HostProbe())

    def warm_up(_: object) -> None:
        big = np.ones(64 * MiB // 8)  # written: resident
        del big

    _, m = meter.measure(lambda: None, warm_up)
    assert m.transient >= 60 * MiB and m.bytes >= 60 * MiB and m.method == "rss+peak"


def test_a_model_building_a_256_mib_tensor_per_run_is_booked_at_least_its_peak(tmp_path) -> None:
    """Regression: a ~200-byte model that builds a 256 MiB tensor on every run was booked at
    1.1 MiB."""
    import asyncio

    from puller.executor import Executor
    from tests.unit.puller.ladder import big_tensor_model

    path = demo.save(big_tensor_model(64 * MiB), tmp_path / "big.onnx")
    assert path.stat().st_size < 300
    executor = Executor(1, 1, cuda=False)
    try:
        model = asyncio.run(executor.load("big", str(path)))
        assert model.size_bytes >= 256 * MiB, model.size_bytes
        assert model.size_bytes < 400 * MiB  # and not the arena's untouched power-of-two region
        assert model.measure_method in ("rss+peak", "heap+peak")
    finally:
        executor.close()


# -- NVML: PID namespaces ---------------------------------------------------------------------


def _status_file(tmp_path, *pids: int) -> str:
    path = tmp_path / "status"
    path.write_text("Name:\tpython\nNSpid:\t" + "\t".join(map(str, pids)) + "\nVmRSS:\t1 kB\n")
    return str(path)


def test_nvml_host_pid_found_through_nspid(tmp_path) -> None:
    """NVML lists host PIDs; where /proc sees the outer namespace NSpid names ours."""
    nvml = FakeNvml(pid=90001)
    probe = NvmlProbe(nvml, pid=7, indices=["0"], status=_status_file(tmp_path, 90001, 7))

    def create() -> None:
        nvml.allocate("0", 90002, 1 << 30)  # a neighbour grows too
        nvml.allocate("0", 90001, 300 << 20)

    _, m = Footprint(probe).measure(create)
    assert (m.bytes, m.method) == (300 << 20, "nvml-nspid")


def test_nvml_host_pid_learned_from_the_only_process_that_grew(tmp_path, caplog) -> None:
    """Regression: in a Kubernetes pod getpid() (and NSpid, one entry) matches nothing in
    NVML's list, and the figure silently fell back to the file size. The one listed process
    that grew during a measurement is this one; later measurements use its PID."""
    nvml = FakeNvml(pid=90001)
    nvml.allocate("0", 90002, 2 << 30)  # a neighbour, already running
    probe = NvmlProbe(nvml, pid=7, indices=["0"], status=_status_file(tmp_path, 7))
    meter = Footprint(probe)
    _, first = meter.measure(lambda: nvml.allocate("0", 90001, 100 << 20))
    assert (first.bytes, first.method, probe.host_pid) == (100 << 20, "nvml-host-pid", 90001)

    def create() -> None:
        nvml.allocate("0", 90002, 1 << 30)
        nvml.allocate("0", 90001, 50 << 20)

    _, second = meter.measure(create)
    assert (second.bytes, second.method) == (50 << 20, "nvml-host-pid")


def test_nvml_without_a_match_uses_the_device_delta_and_says_so(tmp_path, caplog) -> None:
    nvml = FakeNvml(pid=1)
    probe = NvmlProbe(nvml, pid=7, indices=["0"], status=_status_file(tmp_path, 7))

    def create() -> None:  # two unknown processes grow: which one is us is not knowable
        nvml.allocate("0", 90001, 100 << 20)
        nvml.allocate("0", 90002, 10 << 20)

    with caplog.at_level("WARNING"):
        _, m = Footprint(probe).measure(create)
    assert (m.bytes, m.method) == (110 << 20, "nvml-device-delta")
    assert "nvml-device-delta" in caplog.text and probe.host_pid is None


def test_nspids_reads_every_namespace_outermost_first(tmp_path) -> None:
    from puller.gpu import nspids

    assert nspids(_status_file(tmp_path, 90001, 12, 7)) == (90001, 12, 7)
    assert nspids(str(tmp_path / "missing")) == ()


def test_the_arena_reserve_is_calibrated_at_the_first_load(tmp_path) -> None:
    """The per-session reserve the heap reading discounts is learned from onnxruntime itself
    (its CPU arena's first chunk, ~1 MiB in onnxruntime 1.x), not assumed."""
    import asyncio

    from puller.executor import Executor

    executor = Executor(1, 1, cuda=False)
    try:
        assert executor.footprint.probe.arena_reserve == 0
        asyncio.run(executor.load("m", str(demo.save(demo.linear_model(1), tmp_path / "m.onnx"))))
        assert MiB // 2 <= executor.footprint.probe.arena_reserve <= 2 * MiB
    finally:
        executor.close()
