"""A model's measured footprint: the memory its session really adds, not its file size.

Every figure says how it was measured (`Measured.method`, shown in `mesh status`):

    CPU pod, "rss+peak" / "heap+peak": the larger of two readings taken around session
             creation + warm-up, plus the warm-up's transient peak.
             - rss: growth of this process's resident anonymous memory (/proc/self/status
               RssAnon). Exactly what the load added, including the glibc heap fragments it
               leaves behind - but a load that reuses memory freed by an earlier unload
               (glibc keeps freed heap pages) grows it by less than the session holds.
             - heap: growth of glibc's in-use heap (mallinfo2), which no reuse can hide, less
               the untouched part of onnxruntime's per-session CPU arena chunk (~1 MiB
               reserved at the first run, resident only where a run wrote). That reserve is
               calibrated once per process on two throwaway sessions, arena on and off
               (`calibrate`), so a 0.1 MB model is booked at its ~0.23 MiB, not ~1.2 MiB.
               Fresh mmapped chunks count only as far as the resident growth shows them
               written (the arena sizes a region for one 256 MiB tensor at 512 MiB).
             - peak: VmHWM is reset (/proc/self/clear_refs) after creation and read after the
               warm-up; what was resident at the peak but freed by the end (a tensor built
               and dropped on every run) is added on top.
             The method names whichever reading was larger. Without glibc's mallinfo2 only
             the rss reading is taken; where clear_refs is not writable, no peak ("rss").
    GPU pod: NVML per-process device memory (puller/gpu.py, NvmlProbe): "nvml-pid",
             "nvml-nspid", "nvml-host-pid" or, where the driver lists no processes,
             "nvml-device-delta".

Why not PSS after malloc_trim(0): the trim hands freed pages back, so the next session
creation faults them in again (an 8 MiB model: 29 ms instead of 12 ms). These readings are
a /proc read (~7 us, a kept descriptor and buffer: a file object allocated between
onnxruntime's allocations pins heap fragments and moved figures by ~10 %) and mallinfo2 (tens
to hundreds of us: it walks glibc's free lists), and leave the heap alone. Why not glibc's in-use
heap alone: it counts onnxruntime's reserved-but-untouched arena chunk (~1 MiB per session)
and none of the heap fragments a load leaves resident; a fixed mmap threshold would make
both readings agree but faults every load's buffers in fresh (an 8 MiB model: 21 ms vs 9).

Attribution: a delta is only right if nothing else allocates meanwhile, so measurements are
serialised (one at a time per process: `Footprint` holds a lock around before -> load ->
warm-up -> after). Requests running on already loaded sessions can still grow their own
arenas during a measurement; that only ever books more. A request larger than any measured
one is re-measured once (`Footprint.remeasure`, under the same lock).

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
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from puller.gpu import Device, Measured, NvmlProbe, devices  # noqa: F401 - re-exported (puller/main.py)

log = logging.getLogger(__name__)

T = TypeVar("T")

FILE_SIZE = "file-size"  # the method recorded when no measurement gave anything


class Probe(Protocol):
    def sample(self) -> Any:
        """A reading of the memory this process holds (host or devices)."""
        ...

    def mark_peak(self) -> None:
        """Start watching the transient peak (called after creation, before warm-up)."""
        ...

    def measured(self, before: Any, after: Any, *, new_session: bool) -> Measured:
        """What was added between two readings. `new_session`: a session was created in
        between (its arena reserve is discounted), not just a run."""
        ...


# -- host -------------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> Callable[[], tuple[int, int, int]] | None:
    """glibc's mallinfo2 (2.33+) as a function returning (bytes in use in heap chunks, in
    mmapped chunks, heap regions' size), or None."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2 if name else None
    except (OSError, AttributeError):
        fn = None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []

    def in_use() -> tuple[int, int, int]:
        info = fn()
        return int(info.uordblks), int(info.hblkhd), int(info.arena)

    return in_use


@dataclasses.dataclass(frozen=True)
class HostReading:
    anon: int  # RssAnon
    rss: int  # VmRSS
    hwm: int  # VmHWM: peak VmRSS since the last reset
    heap: tuple[int, int, int] | None  # mallinfo2: in heap chunks, in mmapped chunks, heap size


_FIELDS = (b"\nRssAnon:", b"\nVmRSS:", b"\nVmHWM:")


def _status(fd: int | None, buf: bytearray) -> tuple[int, ...]:
    """Those fields of /proc/<pid>/status (bytes; 0 where missing), read through an open
    descriptor into a reused buffer: a file object's buffers, allocated between onnxruntime's
    allocations, each pinned a heap fragment and moved the figures by up to ~10 %."""
    try:
        n = os.preadv(fd, [buf], 0) if fd is not None else 0
    except OSError:
        n = 0
    out = []
    for key in _FIELDS:
        start = buf.find(key, 0, n)
        end = buf.find(b"kB", start, n)
        out.append(int(buf[start + len(key):end]) * 1024 if 0 <= start < end else 0)
    return tuple(out)


class HostProbe:
    """This process's resident memory, in-use heap and transient peak (module docstring)."""

    def __init__(self, heap: bool = True, peak: bool = True, proc: str = "/proc/self") -> None:
        self._heap = _heap_in_use() if heap else None
        try:  # kept open for the probe's life (closed when it is collected)
            self._status: int | None = os.open(f"{proc}/status", os.O_RDONLY)
        except OSError:
            log.warning("cannot read %s/status: host footprints are the in-use heap only", proc)
            self._status = None
        self._buf = bytearray(1 << 14)
        self._clear_refs = self._open_clear_refs(proc) if peak else None
        self.arena_reserve = 0  # untouched bytes of a session's arena chunk (calibrate)

    @staticmethod
    def _open_clear_refs(proc: str) -> int | None:
        try:
            fd = os.open(f"{proc}/clear_refs", os.O_WRONLY)
            os.write(fd, b"5")  # 5: reset the peak resident set size (VmHWM) to the current one
            return fd
        except OSError:
            log.info("cannot reset VmHWM (%s/clear_refs); footprints have no transient peak", proc)
            return None

    @property
    def _peak(self) -> bool:
        return self._clear_refs is not None

    def __del__(self) -> None:
        # Only once unreachable: closing while a load may still read could hand the number
        # to another file, and mark_peak would write "5" into it.
        for fd in (getattr(self, "_status", None), getattr(self, "_clear_refs", None)):
            if fd is not None:
                os.close(fd)

    @property
    def methods(self) -> tuple[str, ...]:
        suffix = "+peak" if self._peak else ""
        return ("rss" + suffix, "heap" + suffix) if self._heap is not None else ("rss" + suffix,)

    def sample(self) -> HostReading:
        anon, rss, hwm = _status(self._status, self._buf)
        return HostReading(anon, rss, hwm, self._heap() if self._heap is not None else None)

    def mark_peak(self) -> None:
        if self._clear_refs is not None:
            try:
                os.write(self._clear_refs, b"5")
            except OSError:
                self._clear_refs = None

    def measured(self, before: HostReading, after: HostReading, *, new_session: bool) -> Measured:
        grew = after.anon - before.anon
        held = -1
        if before.heap is not None and after.heap is not None:
            chunks, mapped, region = (a - b for a, b in zip(after.heap, before.heap, strict=True))
            # Fresh mmapped chunks (glibc never reuses them) are resident only where written:
            # what of them the resident growth outside the heap regions does not show is
            # untouched (a power-of-two arena region sized for one big tensor, say). That may
            # be the arena chunk itself, or else it is in the heap: discount it once.
            untouched = max(mapped - max(grew - region, 0), 0) if mapped > 0 else 0
            reserve = self.arena_reserve if new_session else 0
            held = chunks + mapped - max(untouched, reserve)
        # Freed by the end but resident at the peak: a warm-up's dropped tensors.
        transient = max(after.hwm - after.rss, 0) if self._peak else 0
        suffix = "+peak" if self._peak else ""
        if held > grew:
            return Measured(held + transient, "heap" + suffix, transient)
        return Measured(max(grew, 0) + transient, "rss" + suffix, transient)

    def calibrate(self, create: Callable[[bool], object], n: int = 8) -> None:
        """Learns `arena_reserve`: `create(arena)` builds and runs a tiny session with
        onnxruntime's CPU arena on or off; n of each are held at once. The reserve is the
        in-use growth the arena adds less the resident growth it adds."""
        if self._heap is None:
            return
        held: list[object] = []

        def grows(arena: bool) -> tuple[int, int]:
            before = self.sample()
            held.extend(create(arena) for _ in range(n))
            after = self.sample()
            in_use = sum(after.heap[:2]) - sum(before.heap[:2])  # type: ignore[index]
            return in_use, after.anon - before.anon

        heap_off, anon_off = grows(False)
        heap_on, anon_on = grows(True)
        reserved = max(heap_on - heap_off, 0)
        touched = max(anon_on - anon_off, 0)
        self.arena_reserve = min(max(reserved - touched, 0), reserved) // n
        log.debug("onnxruntime CPU arena: %d bytes reserved, %d untouched per session",
                  reserved // n, self.arena_reserve)


# -- measuring --------------------------------------------------------------------------------


class Footprint:
    """Runs a load between two probe readings, one load at a time."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self._lock = threading.Lock()

    def measure(self, create: Callable[[], T], warm_up: Callable[[T], object] | None = None) -> tuple[T, Measured]:
        """(create's result, what create + warm_up added). Blocking: call it from a worker
        thread. The peak is watched from after creation: creation's own transients (the
        parsed protobuf, initializer copies before prepacking) are gone once it returns."""
        with self._lock:
            before = self.probe.sample()
            result = create()
            self.probe.mark_peak()
            if warm_up is not None:
                warm_up(result)
            after = self.probe.sample()
        return result, self.probe.measured(before, after, new_session=True)

    def remeasure(self, run: Callable[[], T]) -> tuple[T, Measured]:
        """(run's result, what it added). Waits for a load being measured: run unmeasured,
        the arena growth would be kept by the session and never be seen again."""
        with self._lock:
            before = self.probe.sample()
            self.probe.mark_peak()
            result = run()
            after = self.probe.sample()
        return result, self.probe.measured(before, after, new_session=False)


def probe_for(cuda: bool, nvml: Any | None = None) -> Probe:
    """NVML on a GPU pod (the caller keeps NVML initialised), host memory otherwise."""
    if cuda and nvml is not None:
        return NvmlProbe(nvml)
    if cuda:
        log.warning("GPU pod without NVML: footprints measure host memory (method rss/heap), not the device")
    return HostProbe()
