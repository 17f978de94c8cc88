"""onnxruntime sessions: loading (with a warm-up and a size measurement) and running.

Everything blocking runs on one ThreadPoolExecutor sized `executor_threads` on purpose: the
event loop keeps serving while sessions load and run.

On a CUDA pod requests run through IOBinding (MESH_RUNTIME_IO_BINDING=auto): inputs are
bound from the decoded numpy views (copied to the device once, by onnxruntime), outputs are
allocated on the device and copied to host once after the run. BYTES tensors cannot live on
a device, so models with BYTES inputs or outputs run through `session.run`. IOBinding reports
every failure as a bare RuntimeError, so a failed bound run is repeated once through
`session.run`, whose typed error tells a rejected input (INVALID_ARGUMENT) from a failure.

Models with a BF16 input or output (numpy has no bfloat16) run through OrtValues instead,
on CPU and CUDA pods alike (puller/ortvalues.py: outputs bound to host memory); the choice
is made once at load, so the other models' path does not change.

Before a session is created the artifact is vetted (puller/sandbox.py): its first load runs
in a throw-away child process, and only an ok verdict lets it load here; meshserve's own graph
checks (puller/onnxcheck.py) run there, or here when the sandbox is off. Every session is made
with `session_options` (no custom-op library, always parsed as ONNX).

Footprints (puller/footprint.py): a load measures session creation plus a warm-up run at the
model's declared batch (`load(batch=)`: the assignment's max_batch_size; 1 when it has none);
a request with more input elements than any measured run is re-measured once, in the executor
thread, and a changed figure is written to `LoadedModel.size_bytes` in place and reported
through `Executor.on_resize(model_id, size_bytes, method)` on the event loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from mesh import demo
from mesh.errors import InvalidArgument, LoadFailed, MeshError
from puller import gpu, onnxcheck, ortvalues
from puller.datatypes import ORT_TO_V2, V2, TensorSpec
from puller.footprint import FILE_SIZE, Footprint, Measured, probe_for
from puller.sandbox import DEFAULT_MEMORY_BYTES, DEFAULT_TIMEOUT_S, Sandbox
from puller.stats import Execution

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
    bf16: ortvalues.Bf16 | None = None  # its BF16 tensors: runs through puller/ortvalues.py
    measure_method: str = FILE_SIZE  # how size_bytes was measured (puller/footprint.py)
    # The figure's parts: what the session holds, and the largest transient peak of a run
    # on top; and the input elements of the largest run measured so far.
    steady_bytes: int = 0
    peak_bytes: int = 0
    measured_elements: int = 0


def _dims(shape: Sequence[object]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TO_V2.get(arg.type)
    if datatype is None:
        raise LoadFailed(f"tensor '{arg.name}' has type {arg.type}, which meshserve cannot serve")
    return TensorSpec(arg.name, datatype, _dims(arg.shape))


def _elements(feeds: Mapping[str, np.ndarray]) -> int:
    return sum(int(arr.size) for arr in feeds.values())


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """The options of every session the pod creates, in process and in the sandbox child
    (puller/sandbox.py). Never a custom-op library (S7): register_custom_ops_library is not
    called anywhere; and the file is always parsed as ONNX protobuf, the format meshserve's
    own checks read (puller/onnxcheck.py), never as an ORT-format flatbuffer they cannot see."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.load_model_format", "ONNX")
    return options


def warm_up_feeds(inputs: Mapping[str, TensorSpec], batch: int) -> dict[str, np.ndarray]:
    """Dummy feeds: `batch` rows where the first dimension is dynamic, 1 for the others."""
    feeds: dict[str, np.ndarray] = {}
    for name, spec in inputs.items():
        shape = tuple(d if d >= 0 else (batch if i == 0 else 1) for i, d in enumerate(spec.shape))
        if spec.datatype == "BYTES":
            feeds[name] = np.full(shape, "", dtype=object)
        else:
            feeds[name] = np.ones(shape, dtype=V2[spec.datatype][0])
    return feeds


def warm_up_run(session: ort.InferenceSession, inputs: Mapping[str, TensorSpec],
                outputs: Mapping[str, TensorSpec], batch: int) -> int:
    """One run on `warm_up_feeds` (here and in the sandbox child, puller/sandboxchild.py);
    the input elements it ran. Raises what the run raises."""
    feeds = warm_up_feeds(inputs, batch)
    bf16 = ortvalues.Bf16.of(inputs, outputs)
    if bf16 is None:
        session.run(None, feeds)
    else:
        ortvalues.run(session, feeds, list(outputs), bf16)
    return _elements(feeds)


def _trim() -> None:
    """Returns glibc's free heap pages to the system (the footprint then sees a load's real
    growth); a no-op where there is no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
        sandbox: Sandbox | None = None,
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
        # Called on the event loop thread when a re-measure changes a model's size_bytes:
        # (model_id, new size_bytes, method). The agent rewrites its records from it.
        self.on_resize: Callable[[str, int, str], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # puller/sandbox.py: first loads in a throw-away child (on unless a caller passes one
        # that is off: then the graph checks run here, with its limit on declared sizes).
        self.sandbox = sandbox if sandbox is not None else Sandbox(
            DEFAULT_MEMORY_BYTES, DEFAULT_TIMEOUT_S, None, intra_op_threads, self.providers)

    async def load(self, model_id: str, path: str, batch: int = 0, sha256: str = "") -> LoadedModel:
        """Vets (puller/sandbox.py: `sha256` is the artifact's verified digest, "" when none
        was given), then creates, warms up (at `batch` rows where the first dimension is
        dynamic) and measures a session."""
        loop = self._loop = asyncio.get_running_loop()
        batch = max(batch, 1)
        locations: tuple[str, ...] | None = None  # None: check the graph here first
        if self.sandbox.enabled:
            verdict = await self.sandbox.vet(path, batch, sha256)
            if not verdict.ok:
                raise LoadFailed(verdict.message(model_id))
            locations = verdict.locations
        async with self._measure:
            return await loop.run_in_executor(self.pool, self._load, model_id, path, batch, locations)

    def _check(self, model_id: str, path: str, locations: tuple[str, ...] | None) -> None:
        """meshserve's own checks before onnxruntime opens the file (puller/onnxcheck.py): the
        whole graph, or, after a sandbox verdict for these bytes, the external data files
        again (the folder is not covered by the sha256)."""
        artifact = pathlib.Path(path)
        try:
            if locations is None:
                onnxcheck.check_model(artifact, self.sandbox.memory_bytes)
                _trim()  # the parse's freed buffers, reused by onnxruntime, would hide its growth
            else:
                onnxcheck.check_locations(artifact.parent, locations)
        except LoadFailed as exc:
            raise LoadFailed(f"cannot load model '{model_id}': {exc.message}") from None

    def _load(self, model_id: str, path: str, batch: int, locations: tuple[str, ...] | None = None) -> LoadedModel:
        start = time.perf_counter()
        file_size = os.path.getsize(path)
        self._check(model_id, path, locations)
        self._prime()
        elements = 0

        def warm_up(created: tuple[ort.InferenceSession, dict[str, TensorSpec], dict[str, TensorSpec], object]) -> None:
            nonlocal elements
            elements = self._warm_up(model_id, created[0], created[1], created[2], batch)

        (session, inputs, outputs, bytes_inputs), measured = self.footprint.measure(
            lambda: self._create(model_id, path), warm_up
        )
        if measured.bytes <= 0:
            # Never silently: the figure says it is the file size, and the log says which
            # measurement gave nothing.
            log.warning("footprint of model '%s': %s measured nothing; booking its file size (%d bytes)",
                        model_id, measured.method, file_size)
            measured = Measured(file_size, FILE_SIZE)
        load_ms = int((time.perf_counter() - start) * 1000)
        has_bytes = bool(bytes_inputs) or any(s.datatype == "BYTES" for s in outputs.values())
        bf16 = ortvalues.Bf16.of(inputs, outputs)
        bound = self.io_binding and not has_bytes and bf16 is None
        return LoadedModel(
            model_id, session, inputs, outputs, measured.bytes, load_ms, bytes_inputs, bound, bf16,
            measure_method=measured.method, steady_bytes=measured.steady, peak_bytes=measured.transient,
            measured_elements=elements,
        )

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
            calibrate = getattr(self.footprint.probe, "calibrate", None)
            if calibrate is not None:

                def create(arena: bool) -> ort.InferenceSession:
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads, opts.inter_op_num_threads = self.intra_op_threads, 1
                    opts.enable_cpu_mem_arena = arena
                    made = ort.InferenceSession(tiny, sess_options=opts, providers=self.providers)
                    made.run(None, {"input": np.ones((1, 4), dtype=np.float32)})
                    return made

                calibrate(create)
        except Exception as exc:  # noqa: BLE001 - only makes the first figure less exact
            log.debug("onnxruntime priming session failed: %s", exc)

    def _create(
        self, model_id: str, path: str
    ) -> tuple[ort.InferenceSession, dict[str, TensorSpec], dict[str, TensorSpec], frozenset[str]]:
        """Session creation (the footprint measures it with the warm-up that follows)."""
        options = session_options(self.intra_op_threads)
        try:
            session = ort.InferenceSession(path, sess_options=options, providers=self.providers)
        except Exception as exc:  # the message names the cache path: keep it out of etcd
            reason = str(exc).replace(path, "<artifact>")
            raise LoadFailed(f"onnxruntime cannot load model '{model_id}': {reason}") from exc
        inputs = {arg.name: _spec(arg) for arg in session.get_inputs()}
        outputs = {arg.name: _spec(arg) for arg in session.get_outputs()}
        refused = ortvalues.refusal(inputs, outputs)
        if refused is not None:
            raise LoadFailed(f"meshserve cannot serve model '{model_id}': {refused}")
        bytes_inputs = frozenset(n for n, s in inputs.items() if s.datatype == "BYTES")
        return session, inputs, outputs, bytes_inputs

    def _warm_up(
        self, model_id: str, session: ort.InferenceSession, inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec], batch: int = 1,
    ) -> int:
        """One run on dummy feeds, `batch` rows where the first dimension is dynamic (1 for
        the other dynamic dimensions); the input elements it measured (0 when it failed)."""
        try:
            return warm_up_run(session, inputs, outputs, batch)
        except Exception as exc:  # some graphs reject dummy values; serving may still work
            log.warning("warm-up run of model '%s' failed (serving anyway): %s", model_id, exc)
            return 0

    async def run(self, model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str],
                  execution: Execution | None = None) -> list[np.ndarray]:
        """Runs in the pool; `execution` (puller/stats.py) gets the run's start and end."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._timed, model, feeds, outputs, execution)

    def _timed(self, model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str],
               execution: Execution | None) -> list[np.ndarray]:
        if execution is None:
            return self._run(model, feeds, outputs)
        execution.started_ns = time.perf_counter_ns()
        try:
            return self._run(model, feeds, outputs)
        finally:
            execution.ended_ns = time.perf_counter_ns()

    def _run(self, model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        elements = _elements(feeds)
        if elements <= model.measured_elements:
            return self._run_once(model, feeds, outputs)
        # Larger than any run measured: its arena growth and peak are measured, once per new
        # largest size (waiting for a load's measurement, at most one load's create + warm-up).
        result, measured = self.footprint.remeasure(lambda: self._run_once(model, feeds, outputs))
        model.measured_elements = max(model.measured_elements, elements)
        self._grow(model, measured)
        return result

    def _grow(self, model: LoadedModel, measured: Measured) -> None:
        steady = model.steady_bytes + measured.steady
        peak = max(model.peak_bytes, measured.transient)
        size = steady + peak
        # Below this a re-measure is noise (Python objects, a page of arena): no record churn.
        if size - model.size_bytes < max(64 << 10, model.size_bytes // 100):
            return
        model.steady_bytes, model.peak_bytes = steady, peak
        model.size_bytes, model.measure_method = size, measured.method
        log.info("model %s re-measured at %d bytes (%s) after a larger request", model.model_id, size, measured.method)
        loop, hook = self._loop, self.on_resize
        if loop is None or hook is None:
            return
        try:
            loop.call_soon_threadsafe(hook, model.model_id, size, measured.method)
        except RuntimeError:  # the loop has closed: shutting down
            pass

    def _run_once(self, model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        if model.bound:
            try:
                return self._run_bound(model, feeds, outputs)
            except Exception as exc:  # noqa: BLE001 - repeated below for a typed error
                log.debug("bound run of %s failed (%s); repeating through session.run", model.model_id, exc)
        for name in model.bytes_inputs:
            feeds[name] = _to_ort_strings(name, feeds[name])
        try:
            if model.bf16 is not None:  # never bound (see _load): its own binding, host outputs
                return ortvalues.run(model.session, feeds, outputs, model.bf16)
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
        self.sandbox.close()
