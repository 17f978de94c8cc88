"""A model's measured footprint: the memory its session really took, not its file size.

    GPU pod: NVML. Per device, this process's used device memory (the per-process figure from
             nvmlDeviceGetComputeRunningProcesses; the device-wide `used` where the driver does
             not report processes, e.g. some MIG setups) before session creation and after the
             warm-up run; the footprint is the summed growth.
    CPU pod: the bytes this process's heap has in use (glibc mallinfo2: allocated chunks plus
             mmapped chunks) before session creation and after the warm-up run. A session's
             weights, graph and arenas are heap allocations; freed-but-cached heap pages are not
             "in use", so the figure neither hides nor inflates them, and reading it costs
             microseconds. It counts what onnxruntime has allocated, including the first chunk
             of its CPU memory arena (about 1 MiB per session, reserved for intermediate
             tensors and resident once runs use it), which a page-level figure (PSS) only
             counts once touched: for tiny models the heap figure is ~1 MiB higher, for large
             ones the two agree within a few percent. Where mallinfo2 is missing (not glibc):
             the process's PSS (RSS where smaps_rollup is unreadable) read right after
             malloc_trim(0) instead. (The trim is
             the costly part: it hands freed pages back, so the next session creation faults
             them in again - about 16 ms per 8 MiB model here, which is why it is the fallback.)

Attribution: a delta is only right if nothing else allocates meanwhile, so measurements are
serialised (one at a time per process, `Footprint.measure` holds a lock around
before -> load -> warm-up -> after). Requests running on already loaded sessions can still grow
their own arenas during a measurement; warm-up runs keep that small.

Capacity: a GPU pod offers each device's total minus the configured reserve
(MESH_RUNTIME_RESERVE); `devices()` describes every GPU and MIG slice for the instance record.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Probe(Protocol):
    def sample(self) -> int:
        """Bytes this process currently holds on the measured memory (host or devices)."""
        ...


# -- host -------------------------------------------------------------------------------------


def _malloc_trim() -> Callable[[], None]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is None:  # not glibc: readings are a little noisier, still measured
        return lambda: None
    return lambda: trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> Callable[[], int] | None:
    """glibc's mallinfo2 (2.33+) as a function returning in-use heap bytes, or None."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2 if name else None
    except (OSError, AttributeError):
        fn = None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []

    def in_use() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return in_use


class HostProbe:
    """Heap bytes in use (mallinfo2); without it, PSS (or RSS) after malloc_trim(0)."""

    def __init__(self, pid: int | None = None, heap: bool = True) -> None:
        self.pid = pid or os.getpid()
        self._heap = _heap_in_use() if heap and self.pid == os.getpid() else None
        self._trim = _malloc_trim()

    @property
    def method(self) -> str:
        return "heap" if self._heap is not None else "pss"

    def sample(self) -> int:
        if self._heap is not None:
            return self._heap()
        self._trim()
        pss = self._pss()
        return pss if pss is not None else self._rss()

    def _pss(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def _rss(self) -> int:
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0


# -- GPU --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Device:
    """One GPU or MIG slice as the instance record lists it."""

    index: str  # "0", or "0/mig1" for a MIG slice of GPU 0
    name: str
    total_bytes: int
    capacity_bytes: int  # total minus the reserve

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _handles(nvml: Any) -> list[tuple[str, Any, Any]]:
    """(index, handle, parent handle) for every GPU, MIG slices in place of a MIG-enabled GPU."""
    out: list[tuple[str, Any, Any]] = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        slices: list[tuple[str, Any, Any]] = []
        try:
            current, _ = nvml.nvmlDeviceGetMigMode(handle)
            if current:
                for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                    try:
                        slices.append((f"{i}/mig{j}", nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j), handle))
                    except Exception:  # noqa: BLE001 - an empty slot
                        continue
        except Exception:  # noqa: BLE001 - no MIG support on this GPU / driver
            slices = []
        out.extend(slices or [(str(i), handle, handle)])
    return out


def devices(nvml: Any, reserve: int) -> tuple[Device, ...]:
    """Every GPU / MIG slice with its capacity; the caller has run nvmlInit."""
    out = []
    for index, handle, _ in _handles(nvml):
        total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        out.append(Device(index, name, total, max(total - reserve, 0)))
    return tuple(out)


class NvmlProbe:
    """Device memory this process holds, summed over the devices it measures."""

    def __init__(self, nvml: Any, pid: int | None = None, indices: Sequence[str] | None = None) -> None:
        self.nvml = nvml
        self.pid = pid or os.getpid()
        self.handles = [(i, h) for i, h, _ in _handles(nvml) if indices is None or i in indices]

    def sample(self) -> int:
        return sum(self._used(h) for _, h in self.handles)

    def _used(self, handle: Any) -> int:
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # noqa: BLE001 - not reported here (MIG, permissions): device-wide
            procs = None
        if procs is not None and all(p.usedGpuMemory is not None for p in procs):
            # Per-process figures: other processes on a shared device never count.
            return sum(int(p.usedGpuMemory) for p in procs if p.pid == self.pid)
        return int(self.nvml.nvmlDeviceGetMemoryInfo(handle).used)


# -- measuring --------------------------------------------------------------------------------


class Footprint:
    """Runs a load between two probe readings, one load at a time."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self._lock = threading.Lock()

    def measure(self, load: Callable[[], T]) -> tuple[T, int]:
        """(load's result, bytes it added). Blocking: call it from a worker thread."""
        with self._lock:
            before = self.probe.sample()
            result = load()
            after = self.probe.sample()
        return result, max(after - before, 0)


def probe_for(cuda: bool, nvml: Any | None = None) -> Probe:
    """NVML on a GPU pod (the caller keeps NVML initialised), host memory otherwise."""
    if cuda and nvml is not None:
        return NvmlProbe(nvml)
    return HostProbe()
