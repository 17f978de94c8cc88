"""Footprint measurement: attribution under concurrent loads (fake NVML, no GPU needed),
per-process vs device-wide readings, MIG slices and capacities, and a real host measurement."""

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
        _, got[model] = meter.measure(create)

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

    _, size = meter.measure(create)
    assert size == 300 << 20


def test_several_devices_sum() -> None:
    nvml = FakeNvml(pid=7)
    meter = Footprint(NvmlProbe(nvml, pid=7))

    def create() -> None:
        nvml.allocate("0", 7, 10 << 20)
        nvml.allocate("1/mig1", 7, 20 << 20)

    assert meter.measure(create)[1] == 30 << 20


_MEASURE = """
import asyncio, sys
from puller.executor import Executor
from puller.footprint import Footprint, HostProbe
probe = HostProbe(heap=sys.argv[2] == "heap")
ex = Executor(1, 1, cuda=False, footprint=Footprint(probe))
model = asyncio.run(ex.load("big", sys.argv[1]))
print(probe.method, model.size_bytes)
"""


@pytest.mark.parametrize("method", ["heap", "pss"])
def test_host_footprint_of_a_real_session_is_measured_not_the_file_size(tmp_path, repo_root, method: str) -> None:
    """In a fresh interpreter: this test process's own heap history (sessions and threads of
    earlier tests) would make the PSS fallback's page-level delta noisy."""
    import subprocess
    import sys

    path = demo.save(demo.linear_model(3, weight_bytes=16 << 20), tmp_path / "big.onnx")
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), method], capture_output=True, text=True,
                         timeout=120, cwd=repo_root)
    assert out.returncode == 0, out.stderr
    used, size = out.stdout.split()
    assert used == method  # glibc here: mallinfo2 exists, and the fallback is used when asked
    # The weights live in the session: at least most of them are measured, and the figure is
    # a measurement (it does not equal the file size).
    assert int(size) >= 12 << 20
    assert int(size) != path.stat().st_size


def _agent_with(table, capacity: int):
    """Just the parts of an Agent the unload buffer reads (no etcd)."""
    from mesh.metrics import Metrics
    from puller.agent import Agent, Identity

    agent = object.__new__(Agent)
    agent.table = table
    agent.identity = Identity("pod", "127.0.0.1:1", capacity)
    agent.metrics = Metrics()
    agent._unloading = {}
    return agent


class _Table:
    def __init__(self, used: int) -> None:
        self.used = used

    def used_bytes(self) -> int:
        return self.used


def test_unload_buffer_holds_a_load_until_the_unload_it_needs_is_done() -> None:
    import asyncio

    async def scenario() -> list[str]:
        table = _Table(used=60)
        agent = _agent_with(table, capacity=100)
        order: list[str] = []
        release = asyncio.Event()

        async def unload() -> None:
            await release.wait()
            table.used = 0
            order.append("unloaded")
            agent._unloading.pop("old", None)

        agent._unloading["old"] = asyncio.ensure_future(unload())

        async def load() -> None:
            await agent._await_room(50)
            order.append("load starts")

        task = asyncio.ensure_future(load())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not task.done()  # 60 + 50 > 100 while the unload is still running
        release.set()
        await asyncio.wait_for(task, 5)
        assert agent.metrics.registry.get_sample_value("mesh_load_waits_total") == 1
        # Fits already: no wait, even with an unload under way.
        blocker = asyncio.Event()
        agent._unloading["slow"] = asyncio.ensure_future(blocker.wait())
        await asyncio.wait_for(agent._await_room(90), 1)
        # Does not fit and nothing is unloading: placement decided; load (no deadlock).
        agent._unloading.pop("slow").cancel()
        table.used = 95
        await asyncio.wait_for(agent._await_room(50), 1)
        return order

    assert asyncio.run(scenario()) == ["unloaded", "load starts"]
