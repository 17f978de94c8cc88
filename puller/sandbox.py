"""First loads of untrusted models in a throw-away child process (S8, A4): the pod's side.

Before the pod creates a session for an artifact it has no verdict for, a child process does
everything the pod's load would (puller/sandboxchild.py): meshserve's own graph checks
(puller/onnxcheck.py), session creation with the pod's session options and providers, the
warm-up run at the model's batch and the session's destruction, under limits:

- memory: RLIMIT_AS = the child's own size at start + `memory_bytes` (CPU pods; on a CUDA pod
  the CUDA runtime reserves address space far beyond any useful limit, so there only the time
  limits apply, and device memory errors are onnxruntime errors);
- time: a wall-clock limit (the child is killed past it) and RLIMIT_CPU of that limit times
  the session's threads plus one; core dumps off.

How the child ended becomes a `Verdict`: ok, refused (a graph check), error (onnxruntime's
text, truncated, without the artifact's path), crashed (a signal), out_of_memory, timed_out.
Only ok lets the pod load the model in process; the others are the copy's FAILED reason.

Verdicts are kept per sha256 of the artifact (the assignment's verified sha256, else the
file's, hashed once per file version) with the context that decided them (onnxruntime version,
providers, limits, batch): in memory and, across restarts, as files of mode 0600 in
`verdict_dir`. A changed limit or onnxruntime version vets again; so does deleting the files.

Cost: children fork from a zygote process started once (`start`) with onnxruntime imported,
so a first load pays a fork plus the load itself; one child runs at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import select
import signal
import subprocess
import sys
import threading
import uuid
from typing import Any

from mesh.metrics import Metrics
from puller.sandboxchild import (
    ANSWER_BYTES,
    CRASHED,
    ERROR,
    MAX_LOCATIONS,
    OK,
    OUT_OF_MEMORY,
    READY,
    REASON_CHARS,
    REFUSED,
    REPLY_BYTES,
    RESULTS,
    TIMED_OUT,
)

log = logging.getLogger(__name__)

__all__ = ["CRASHED", "ERROR", "OK", "OUT_OF_MEMORY", "REFUSED", "TIMED_OUT", "Sandbox", "Verdict"]

DEFAULT_MEMORY_BYTES = 4 << 30
DEFAULT_TIMEOUT_S = 120.0
# Test-only: a model whose producer_name equals this variable's value makes the child call
# os.abort() after the graph checks, standing in for an onnxruntime crash (the tests say so).
TEST_CRASH_ENV = "MESH_RUNTIME_SANDBOX_TEST_CRASH_PRODUCER"
_ZYGOTE_ENV = frozenset({"PATH", "HOME", "LANG", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
                         "VIRTUAL_ENV", "PYTHONHASHSEED"})
_ZYGOTE_ENV_PREFIXES = ("LC_", "OMP_", "MKL_", "ORT_", "NVIDIA_", "CUDA_")
_MEMORY_CACHE = 4096  # verdicts kept in memory
_ZYGOTE_START_S = 120.0  # importing onnxruntime on a busy node
_ANSWER_SLACK_S = 30.0  # the zygote answers this long after the child's limit at the latest
_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parent.parent)


@dataclasses.dataclass(frozen=True)
class Verdict:
    result: str
    reason: str = ""  # without the model id: one artifact may be registered under several
    locations: tuple[str, ...] = ()  # external data files the checks found (re-checked per load)
    seconds: float = 0.0  # what the child took

    @property
    def ok(self) -> bool:
        return self.result == OK

    def message(self, model_id: str) -> str:
        m = f"model '{model_id}'"
        return {
            REFUSED: f"cannot load {m}: {self.reason}",
            ERROR: f"onnxruntime cannot load {m}: {self.reason}",
            CRASHED: f"{m} crashed onnxruntime on its first load ({self.reason}); it ran in a throw-away "
                     "process and the pod serves on",
            OUT_OF_MEMORY: f"{m} ran out of memory on its first load: {self.reason}",
            TIMED_OUT: f"{m} {self.reason}",
        }.get(self.result, f"{m}: {self.reason}")


class VerdictStore:
    """Verdicts per sha256, in memory and as files of mode 0600 (folder 0700) in `folder`."""

    def __init__(self, folder: pathlib.Path | None) -> None:
        self.folder = folder
        self._memory: collections.OrderedDict[str, tuple[str, Verdict]] = collections.OrderedDict()

    def get(self, sha256: str, context: str) -> Verdict | None:
        held = self._memory.get(sha256)
        if held is None and self.folder is not None:
            held = self._read(sha256)
        if held is None or held[0] != context:
            return None
        self._remember(sha256, held)
        return held[1]

    def put(self, sha256: str, context: str, verdict: Verdict) -> None:
        self._remember(sha256, (context, verdict))
        if self.folder is None:
            return
        data = json.dumps({"context": context, **dataclasses.asdict(verdict)}).encode()
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.folder, 0o700)
            tmp = self.folder / f".{sha256}.{uuid.uuid4().hex[:8]}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.folder / f"{sha256}.json")
        except OSError as exc:  # the memory copy still holds: only a restart vets again
            log.warning("cannot keep the load verdict of artifact %s on disk: %s", sha256[:12], exc)

    def _remember(self, sha256: str, held: tuple[str, Verdict]) -> None:
        self._memory[sha256] = held
        self._memory.move_to_end(sha256)
        while len(self._memory) > _MEMORY_CACHE:
            self._memory.popitem(last=False)

    def _read(self, sha256: str) -> tuple[str, Verdict] | None:
        assert self.folder is not None
        try:
            raw = json.loads((self.folder / f"{sha256}.json").read_bytes()[:REPLY_BYTES])
            verdict = Verdict(str(raw["result"]), str(raw["reason"]), tuple(str(x) for x in raw["locations"]),
                              float(raw["seconds"]))
            if verdict.result not in RESULTS:
                return None
            return str(raw["context"]), verdict
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: vetted again


class Sandbox:
    def __init__(
        self,
        memory_bytes: int,
        timeout_s: float,
        verdict_dir: pathlib.Path | None,
        intra_op_threads: int,
        providers: list[Any],
        enabled: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.enabled = enabled
        self.memory_bytes = memory_bytes
        self.timeout_s = timeout_s
        self.intra_op_threads = intra_op_threads
        self.providers = providers
        names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
        self.limit_as = "CUDAExecutionProvider" not in names  # see the module docstring
        threads = intra_op_threads or os.cpu_count() or 1
        self.cpu_s = max(1, math.ceil(timeout_s * (threads + 1)))
        self.store = VerdictStore(verdict_dir)
        self.metrics = metrics
        self.children = 0  # children started (tests and the bench read it)
        self._lock = asyncio.Lock()
        self._zygote: subprocess.Popen[bytes] | None = None
        self._zygote_lock = threading.Lock()
        self._digests: dict[tuple[tuple[int, int, int, int], ...], str] = {}
        self._crash_producer = os.environ.get(TEST_CRASH_ENV, "")
        self._starting: asyncio.Future[Any] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the zygote (onnxruntime imported once there) in the background, so the pod
        serves meanwhile; a first load that comes sooner waits for it."""
        if self.enabled:
            self._starting = asyncio.ensure_future(asyncio.to_thread(self._ensure_zygote))
            self._starting.add_done_callback(_log_start)

    async def started(self) -> None:
        if self._starting is not None:
            await asyncio.wait([self._starting])

    def close(self) -> None:
        with self._zygote_lock:
            self._stop_zygote()

    def _ensure_zygote(self) -> subprocess.Popen[bytes]:
        with self._zygote_lock:
            if self._zygote is not None and self._zygote.poll() is None:
                return self._zygote
            self._stop_zygote()
            # Started from a worker thread that lives as long as the event loop's executor:
            # PR_SET_PDEATHSIG fires when that thread ends, i.e. at the pod's shutdown.
            # Only what Python, onnxruntime and CUDA read: the pod's settings and any secret in
            # its environment stay out of the process that opens untrusted models.
            env = {k: v for k, v in os.environ.items() if k in _ZYGOTE_ENV or k.startswith(_ZYGOTE_ENV_PREFIXES)}
            env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
            proc = subprocess.Popen(
                [sys.executable, "-m", "puller.sandboxchild"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                env=env, close_fds=True,
            )
            self._zygote = proc
            line = self._read_line(proc, _ZYGOTE_START_S)
            if line is None or line.strip() != READY.encode():
                self._stop_zygote()
                raise RuntimeError("the load sandbox's zygote process did not start")
            log.info("load sandbox ready (zygote pid %d)", proc.pid)
            return proc

    def _stop_zygote(self) -> None:
        proc, self._zygote = self._zygote, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()  # its child, if any, dies with it (PR_SET_PDEATHSIG)
        with contextlib.suppress(Exception):
            proc.wait(5.0)
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(Exception):
                pipe.close()  # type: ignore[union-attr]

    @staticmethod
    def _read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> bytes | None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        return proc.stdout.readline(ANSWER_BYTES) or None

    # -- vetting ------------------------------------------------------------------------------

    def context(self, batch: int) -> str:
        import onnxruntime as ort

        return json.dumps([ort.__version__, [str(p) for p in self.providers], self.memory_bytes,
                           self.limit_as, self.timeout_s, batch, 1])

    async def vet(self, path: str, batch: int, sha256: str = "") -> Verdict:
        """The artifact's verdict: cached, else from a child (one child at a time)."""
        digest = sha256 or await asyncio.to_thread(self._digest, path)
        context = self.context(batch)
        cached = self.store.get(digest, context)
        if cached is None:
            async with self._lock:
                cached = self.store.get(digest, context)  # another load vetted it meanwhile
                if cached is None:
                    verdict = await self._run(path, batch)
                    self.store.put(digest, context, verdict)
                    log.info("load sandbox: artifact %s: %s in %.2fs%s", digest[:12], verdict.result,
                             verdict.seconds, f" ({verdict.reason})" if verdict.reason else "")
                    if self.metrics is not None:
                        self.metrics.sandbox_runs.labels(verdict.result).inc()
                        self.metrics.sandbox_seconds.observe(verdict.seconds)
                    return verdict
        if self.metrics is not None:
            self.metrics.sandbox_verdict_hits.inc()
        return cached

    def _digest(self, path: str) -> str:
        """sha256 of the artifact (model.onnx, or the tree digest of its folder when it holds
        external data or other files too: the verdict then covers every byte onnxruntime
        reads), hashed once per version (inode, size, mtime of each file)."""
        from puller.cachefiles import ARTIFACT, artifact_sha256, file_sha256

        file = pathlib.Path(path)
        cached = file.name == ARTIFACT  # a cache entry (a folder); else a file of its own
        stats = [os.stat(path)] + ([p.stat() for p in sorted(file.parent.rglob("*")) if p.is_file()]
                                   if cached else [])
        version = tuple((i.st_dev, i.st_ino, i.st_size, i.st_mtime_ns) for i in stats)
        digest = self._digests.get(version)
        if digest is None:
            digest = self._digests[version] = artifact_sha256(file.parent) if cached else file_sha256(file)
        return digest

    async def _run(self, path: str, batch: int) -> Verdict:
        run = asyncio.ensure_future(asyncio.to_thread(self._child_verdict, path, batch))
        try:
            return await asyncio.shield(run)
        except asyncio.CancelledError:
            # The load was cancelled: stop the child (with its zygote) and cache nothing.
            await asyncio.to_thread(self.close)
            with contextlib.suppress(BaseException):
                await run
            raise

    def _child_verdict(self, path: str, batch: int) -> Verdict:
        job = {
            "path": path, "batch": batch, "intra_op_threads": self.intra_op_threads,
            "providers": self.providers, "memory_bytes": self.memory_bytes, "limit_as": self.limit_as,
            "cpu_s": self.cpu_s, "timeout_s": self.timeout_s, "crash_producer": self._crash_producer,
        }
        proc = self._ensure_zygote()
        assert proc.stdin is not None
        self.children += 1
        try:
            proc.stdin.write(json.dumps(job).encode() + b"\n")
            proc.stdin.flush()
            line = self._read_line(proc, self.timeout_s + _ANSWER_SLACK_S)
            answer = json.loads(line) if line else None
        except (OSError, ValueError):
            answer = None
        if not isinstance(answer, dict):  # the zygote died or hung: a fresh one next time
            with self._zygote_lock:
                if self._zygote is proc:
                    self._stop_zygote()
            raise RuntimeError("the load sandbox's zygote process stopped answering")
        return self._verdict(answer.get("reply"), answer.get("status"), bool(answer.get("timed_out")),
                             float(answer.get("seconds") or 0.0))

    def _verdict(self, reply: Any, exitcode: Any, timed_out: bool, seconds: float) -> Verdict:
        limit = (f"it needs more than the {self.memory_bytes} bytes a first load may use "
                 "(MESH_RUNTIME_SANDBOX_MEMORY_BYTES)")
        slow = (f"did not finish its first load (session creation and warm-up) within {self.timeout_s:g}s "
                "(MESH_RUNTIME_SANDBOX_TIMEOUT_S)")
        if timed_out:
            return Verdict(TIMED_OUT, slow, (), seconds)
        if isinstance(reply, dict) and reply.get("result") in RESULTS:
            result = reply["result"]
            reason = limit if result == OUT_OF_MEMORY else str(reply.get("reason", ""))[:REASON_CHARS]
            locations = tuple(str(x) for x in reply.get("locations", ()))[:MAX_LOCATIONS] if result == OK else ()
            return Verdict(result, reason, locations, seconds)
        if isinstance(exitcode, int) and exitcode < 0:
            sig = -exitcode
            if sig == signal.SIGXCPU:
                return Verdict(TIMED_OUT, slow + " of CPU time", (), seconds)
            if sig == signal.SIGKILL:  # nobody else kills it: the kernel's OOM killer
                return Verdict(OUT_OF_MEMORY, limit + "; the kernel killed the load", (), seconds)
            return Verdict(CRASHED, f"killed by {_signame(sig)}", (), seconds)
        return Verdict(CRASHED, f"exited with status {exitcode} before reporting", (), seconds)


def _log_start(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("load sandbox: the zygote did not start (%s); the first load tries again", task.exception())


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
