"""GPU discovery through NVML (pynvml), and the onnxruntime providers that follow from it.

Never raises for a missing driver or library: a pod without a GPU is a CPU pod. CUDA is
requested from onnxruntime only when a GPU is present (asking for it without one logs an
error on every session).
"""

from __future__ import annotations

import dataclasses
import logging
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
