"""GPU discovery through NVML (pynvml), the onnxruntime providers that follow from it, and
the NVML side of footprint measurement (`NvmlProbe`, `devices`).

Never raises for a missing driver or library: a pod without a GPU is a CPU pod. CUDA is
requested from onnxruntime only when a GPU is present (asking for it without one logs an
error on every session).

Which NVML process is this one: NVML lists host PIDs, and in a Kubernetes pod (its own PID
namespace) `os.getpid()` is the PID inside the container, which matches nothing. NSpid in
/proc/self/status lists this process's PID in every PID namespace the mounted /proc can see,
outermost first; a container's own /proc sees only its own namespace (one entry, the same as
getpid), so NSpid finds the host PID only where /proc is an outer namespace's (hostPID, a
shared /proc). Otherwise the host PID is learned from the first measurement where exactly one
listed process grew ("nvml-host-pid"), and where the driver lists no per-process figures
(some MIG setups) the device-wide used-memory delta is taken under the measurement lock
("nvml-device-delta"; other processes on the device count too). Each figure names its method.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from mesh.errors import MeshError

log = logging.getLogger(__name__)

AUTO, NEVER, ALWAYS = "auto", "never", "always"


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    count: int = 0
    total_bytes: int = 0  # memory of device 0, the one this pod uses
    name: str = ""

    @property
    def present(self) -> bool:
        return self.count > 0


def detect() -> GpuInfo:
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is a dependency; a broken install is a CPU pod
        return GpuInfo()
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.debug("no NVIDIA GPU: %s", exc)
        return GpuInfo()
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return GpuInfo()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        name = pynvml.nvmlDeviceGetName(handle)
        return GpuInfo(count, total, name.decode() if isinstance(name, bytes) else str(name))
    except Exception as exc:
        log.warning("NVML present but querying the GPU failed: %s", exc)
        return GpuInfo()
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def open_nvml() -> Any | None:
    """The initialised pynvml module, kept open for this process's measurements (None when
    NVML cannot start: no driver, no GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:  # noqa: BLE001 - no driver / library: nothing to measure with
        log.warning("NVML unavailable; model footprints fall back to host memory: %s", exc)
        return None


def _mode(setting: str, value: str) -> str:
    mode = value.strip().lower()
    if mode not in (AUTO, NEVER, ALWAYS):
        raise MeshError(f"{setting} must be auto, never or always, not {value!r}")
    return mode


def use_cuda(use_gpu: str, info: GpuInfo) -> bool:
    """Whether sessions should run on CUDA; raises when `always` is asked without a GPU."""
    mode = _mode("MESH_RUNTIME_USE_GPU", use_gpu)
    if mode == NEVER:
        return False
    if mode == ALWAYS and not info.present:
        raise MeshError("MESH_RUNTIME_USE_GPU=always but no NVIDIA GPU was found")
    return info.present


def use_io_binding(io_binding: str, cuda: bool) -> bool:
    """MESH_RUNTIME_IO_BINDING: auto (on CUDA pods), always, never."""
    mode = _mode("MESH_RUNTIME_IO_BINDING", io_binding)
    return mode == ALWAYS or (mode == AUTO and cuda)


def providers(cuda: bool) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


# -- footprints -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measured:
    """A footprint figure and how it was measured (also puller.footprint.Measured)."""

    bytes: int  # everything booked, the transient peak included
    method: str
    transient: int = 0  # of which: resident at the peak, freed by the end

    @property
    def steady(self) -> int:
        return self.bytes - self.transient


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


def nspids(status: str = "/proc/self/status") -> tuple[int, ...]:
    """This process's PID in each PID namespace /proc can see, outermost first (NSpid)."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return tuple(int(x) for x in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


@dataclasses.dataclass(frozen=True)
class NvmlReading:
    procs: dict[str, dict[int, int] | None]  # device -> {pid: used bytes}, None: not listed
    used: dict[str, int]  # device -> device-wide used bytes


class NvmlProbe:
    """Device memory this process holds, summed over the devices it measures (module docstring
    for how this process is found in NVML's list)."""

    def __init__(
        self, nvml: Any, pid: int | None = None, indices: Sequence[str] | None = None, status: str = "/proc/self/status"
    ) -> None:
        self.nvml = nvml
        self.pid = pid or os.getpid()
        # NSpid's first entry is the PID in the outermost namespace /proc sees.
        self.nspids = tuple(p for p in nspids(status) if p != self.pid)
        self.host_pid: int | None = None  # learned (see measured)
        self.handles = [(i, h) for i, h, _ in _handles(nvml) if indices is None or i in indices]
        self._warned: set[str] = set()

    def sample(self) -> NvmlReading:
        procs: dict[str, dict[int, int] | None] = {}
        used: dict[str, int] = {}
        for index, handle in self.handles:
            procs[index] = self._procs(handle)
            used[index] = int(self.nvml.nvmlDeviceGetMemoryInfo(handle).used)
        return NvmlReading(procs, used)

    def _procs(self, handle: Any) -> dict[int, int] | None:
        try:
            listed = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # noqa: BLE001 - not reported here (MIG, permissions)
            return None
        if listed is None or any(p.usedGpuMemory is None for p in listed):
            return None
        out: dict[int, int] = {}
        for p in listed:
            out[int(p.pid)] = out.get(int(p.pid), 0) + int(p.usedGpuMemory)
        return out

    def mark_peak(self) -> None:
        """Nothing to reset: onnxruntime's CUDA arena keeps what a run used, and NVML's
        per-process figure includes it."""

    def _method_for(self, before: NvmlReading, after: NvmlReading) -> tuple[str, set[int]]:
        listed = [(before.procs[i], p) for i, p in after.procs.items() if p is not None]
        seen = {pid for _, p in listed for pid in p}
        if self.pid in seen:
            return "nvml-pid", {self.pid}
        if seen & set(self.nspids):
            return "nvml-nspid", seen & set(self.nspids)
        if self.host_pid in seen:
            return "nvml-host-pid", {self.host_pid}  # type: ignore[arg-type]
        if listed:
            grew = {pid for b, p in listed for pid, n in p.items() if n > (b or {}).get(pid, 0)}
            if len(grew) == 1:  # only this process grew while the measurement held the lock
                (self.host_pid,) = grew
                log.info("NVML lists this process as PID %d (PID namespace): measuring by it", self.host_pid)
                return "nvml-host-pid", grew
        return "nvml-device-delta", set()

    def measured(self, before: NvmlReading, after: NvmlReading, *, new_session: bool) -> Measured:
        method, pids = self._method_for(before, after)
        if method == "nvml-device-delta":
            added = sum(max(n - before.used.get(i, 0), 0) for i, n in after.used.items())
            if method not in self._warned:
                self._warned.add(method)
                log.warning(
                    "NVML lists no per-process memory for this process (PID %d, NSpid %s): footprints "
                    "are the device-wide used-memory delta (nvml-device-delta); other processes on "
                    "the device count too", self.pid, list(self.nspids) or "-")
            return Measured(added, method)
        added = 0
        for index, procs in after.procs.items():
            if procs is None:  # this device lists nobody: its device-wide delta
                added += max(after.used[index] - before.used.get(index, 0), 0)
                continue
            old = before.procs.get(index) or {}
            added += sum(max(procs.get(p, 0) - old.get(p, 0), 0) for p in pids)
        return Measured(added, method)

