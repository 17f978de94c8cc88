"""onnxruntime sessions: loading (with a warm-up and a size measurement) and running.

Everything blocking runs on one ThreadPoolExecutor sized `executor_threads` on purpose: the
event loop keeps serving while sessions load and run.

On a CUDA pod requests run through IOBinding (MESH_RUNTIME_IO_BINDING=auto): inputs are
bound from the decoded numpy views (copied to the device once, by onnxruntime), outputs are
allocated on the device and copied to host once after the run. BYTES tensors cannot live on
a device, so models with BYTES inputs or outputs run through `session.run`. IOBinding reports
every failure as a bare RuntimeError, so a failed bound run is repeated once through
`session.run`, whose typed error tells a rejected input (INVALID_ARGUMENT) from a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from mesh import demo
from mesh.errors import InvalidArgument, LoadFailed, MeshError
from puller import gpu
from puller.datatypes import ORT_TO_V2, V2, TensorSpec
from puller.footprint import Footprint, probe_for

log = logging.getLogger(__name__)

# onnxruntime raises these when the feeds (values or dynamic sizes) do not suit the graph; the
# shapes and datatypes we could check before running already passed (codec.py).
_INPUT_ERRORS = (ort_errors.InvalidArgument, ort_errors.Fail)


@dataclasses.dataclass(eq=False)
class LoadedModel:
    model_id: str
    session: ort.InferenceSession
    inputs: dict[str, TensorSpec]  # in the model's order
    outputs: dict[str, TensorSpec]
    size_bytes: int
    load_ms: int
    bytes_inputs: frozenset[str] = frozenset()  # BYTES inputs: onnxruntime wants str
    bound: bool = False  # runs through IOBinding (see the module docstring)


def _dims(shape: Sequence[object]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TO_V2.get(arg.type)
    if datatype is None:
        raise LoadFailed(f"tensor '{arg.name}' has type {arg.type}, which meshserve cannot serve")
    return TensorSpec(arg.name, datatype, _dims(arg.shape))


def _to_ort_strings(name: str, arr: np.ndarray) -> np.ndarray:
    try:
        items = [x.decode() if isinstance(x, bytes) else str(x) for x in arr.ravel()]
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"input '{name}': BYTES element is not UTF-8 (onnxruntime strings are text)") from exc
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(arr.shape)


class Executor:
    def __init__(
        self,
        threads: int,
        intra_op_threads: int,
        cuda: bool,
        footprint: Footprint | None = None,
        io_binding: bool | None = None,
    ) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ort")
        self.threads = threads  # also bounds each batching model's runs in flight (batching.py)
        self.intra_op_threads = intra_op_threads
        self.providers = gpu.providers(cuda)
        self.io_binding = cuda if io_binding is None else io_binding
        self.output_device = "cuda" if cuda else "cpu"  # where bound outputs are allocated
        # puller/footprint.py: NVML device memory on a GPU pod, heap bytes in use otherwise.
        self.footprint = footprint or Footprint(probe_for(cuda, gpu.open_nvml() if cuda else None))
        # Loads are measured one at a time: a delta taken while another session is being
        # created would count both. Waiting here (not in Footprint's lock) keeps pool threads
        # free for requests.
        self._measure = asyncio.Lock()
        self._primed = False

    async def load(self, model_id: str, path: str) -> LoadedModel:
        loop = asyncio.get_running_loop()
        async with self._measure:
            return await loop.run_in_executor(self.pool, self._load, model_id, path)

    def _load(self, model_id: str, path: str) -> LoadedModel:
        start = time.perf_counter()
        file_size = os.path.getsize(path)
        self._prime()
        (session, inputs, outputs, bytes_inputs), measured = self.footprint.measure(
            lambda: self._create(model_id, path)
        )
        if measured > 0:
            size = measured
        else:  # below the probe's resolution (a tiny model): its weights are the best figure
            log.debug("footprint of %s below measurement resolution; using its file size", model_id)
            size = file_size
        load_ms = int((time.perf_counter() - start) * 1000)
        has_bytes = bool(bytes_inputs) or any(s.datatype == "BYTES" for s in outputs.values())
        bound = self.io_binding and not has_bytes
        return LoadedModel(model_id, session, inputs, outputs, size, load_ms, bytes_inputs, bound)

    def _prime(self) -> None:
        """Pays onnxruntime's one-time process costs (thread pools, allocators, kernels
        registry) on a throwaway session, so the first real model is not charged for them."""
        if self._primed:
            return
        self._primed = True
        try:
            tiny = demo.linear_model(0).SerializeToString()
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.intra_op_threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(tiny, sess_options=options, providers=self.providers)
            session.run(None, {"input": np.ones((1, 4), dtype=np.float32)})
        except Exception as exc:  # noqa: BLE001 - only makes the first figure less exact
            log.debug("onnxruntime priming session failed: %s", exc)

    def _create(
        self, model_id: str, path: str
    ) -> tuple[ort.InferenceSession, dict[str, TensorSpec], dict[str, TensorSpec], frozenset[str]]:
        """Session creation + warm-up: everything the footprint measures."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(path, sess_options=options, providers=self.providers)
        except Exception as exc:  # the message names the cache path: keep it out of etcd
            reason = str(exc).replace(path, "<artifact>")
            raise LoadFailed(f"onnxruntime cannot load model '{model_id}': {reason}") from exc
        inputs = {arg.name: _spec(arg) for arg in session.get_inputs()}
        outputs = {arg.name: _spec(arg) for arg in session.get_outputs()}
        bytes_inputs = frozenset(n for n, s in inputs.items() if s.datatype == "BYTES")
        self._warm_up(model_id, session, inputs)
        return session, inputs, outputs, bytes_inputs

    def _warm_up(self, model_id: str, session: ort.InferenceSession, inputs: Mapping[str, TensorSpec]) -> None:
        feeds: dict[str, np.ndarray] = {}
        for name, spec in inputs.items():
            shape = tuple(d if d >= 0 else 1 for d in spec.shape)
            if spec.datatype == "BYTES":
                feeds[name] = np.full(shape, "", dtype=object)
            else:
                feeds[name] = np.ones(shape, dtype=V2[spec.datatype][0])
        try:
            session.run(None, feeds)
        except Exception as exc:  # some graphs reject dummy values; serving may still work
            log.warning("warm-up run of model '%s' failed (serving anyway): %s", model_id, exc)

    async def run(self, model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._run, model, feeds, outputs)

    def _run(self, model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        if model.bound:
            try:
                return self._run_bound(model, feeds, outputs)
            except Exception as exc:  # noqa: BLE001 - repeated below for a typed error
                log.debug("bound run of %s failed (%s); repeating through session.run", model.model_id, exc)
        for name in model.bytes_inputs:
            feeds[name] = _to_ort_strings(name, feeds[name])
        try:
            return model.session.run(outputs, feeds)
        except _INPUT_ERRORS as exc:
            raise InvalidArgument(f"model '{model.model_id}' rejected the input: {exc}") from exc
        except Exception as exc:
            raise MeshError(f"model '{model.model_id}' failed to run: {exc}") from exc

    def _run_bound(self, model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        binding = model.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))  # a view when already contiguous
        for name in outputs:
            binding.bind_output(name, self.output_device)
        model.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
