"""The load sandbox's processes (puller/sandbox.py is the pod's side).

    pod --stdin/stdout, JSON lines--> zygote (`python -m puller.sandboxchild`) --fork--> child

The zygote is started once per pod with onnxruntime, onnx and numpy imported, and never loads
a model itself: for each job it forks a child, waits for the child's reply (one JSON object on
a pipe) up to the job's wall-clock limit, kills the child past it, reaps it and answers the pod
with the reply and how the child ended. Both die with their parent (PR_SET_PDEATHSIG), so a
pod that stops or gives up on a job (kills the zygote) leaves no process behind.

The child sets its limits (no core dumps; RLIMIT_CPU; RLIMIT_AS = its size at start + the
job's memory bytes, where the job says so), then runs meshserve's graph checks
(puller/onnxcheck.py), creates the session with the pod's options and providers, runs the
warm-up at the job's batch and destroys the session, and replies ok (with the external data
files found), refused, error (text without the artifact's path), or out_of_memory.

Nothing here unpickles anything: a child under the control of an exploited onnxruntime can
send the pod only bytes that are parsed as JSON, 64 KiB at most.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import re
import resource
import select
import signal
import sys
import time
from typing import Any

OK, REFUSED, ERROR, CRASHED, OUT_OF_MEMORY, TIMED_OUT = (
    "ok", "refused", "error", "crashed", "out_of_memory", "timed_out")
RESULTS = (OK, REFUSED, ERROR, CRASHED, OUT_OF_MEMORY, TIMED_OUT)
READY = "ready"
REPLY_BYTES = 64 << 10
MAX_LOCATIONS = 256  # external data files per model the pod is told of (onnxcheck refuses more)
MAX_LOCATION_CHARS = 1024
ANSWER_BYTES = 4 << 20  # the zygote's answer line, bounded by the three above
REASON_CHARS = 500
_MEMORY_WORDS = ("bad_alloc", "bad allocation", "failed to allocate memory", "cannot allocate memory",
                 "out of memory", "memoryerror")
_PR_SET_PDEATHSIG = 1
_ORT_SOURCE = re.compile(r"/onnxruntime_src/[^\s:]+:\d+\s*")  # onnxruntime's build paths
_KILL_GRACE_S = 5.0  # a child that replied but does not exit is killed after this


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pod's kill of the zygote still ends a job
        pass


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _is_memory(text: str) -> bool:
    low = text.lower()
    return any(w in low for w in _MEMORY_WORDS)


# -- the child --------------------------------------------------------------------------------


def _child(fd: int, job: dict[str, Any]) -> None:
    """Runs in the forked child: limits, checks, session, warm-up, one reply, exit."""
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu_s = int(job["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 2))  # SIGXCPU, then SIGKILL
    if job["limit_as"]:
        limit = _vm_size() + int(job["memory_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        reply = _vet(job)
    except MemoryError:
        reply = {"result": OUT_OF_MEMORY}
    except BaseException as exc:  # noqa: BLE001 - reported, never raised in the child
        reply = {"result": ERROR, "reason": f"{type(exc).__name__}: {exc}"[:REASON_CHARS]}
    data = json.dumps(reply).encode()[:REPLY_BYTES]
    while data:
        data = data[os.write(fd, data):]
    os._exit(0)  # no interpreter teardown: nothing more can go wrong after the reply


def _vet(job: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    from mesh.errors import LoadFailed
    from puller import executor, onnxcheck

    path = str(job["path"])
    try:
        checked = onnxcheck.check_model(pathlib.Path(path), int(job["memory_bytes"]))
    except LoadFailed as exc:
        return {"result": REFUSED, "reason": exc.message}
    if job.get("crash_producer") and checked.producer == job["crash_producer"]:
        os.abort()  # test hook (puller/sandbox.py TEST_CRASH_ENV): stands in for a crash
    options = executor.session_options(int(job["intra_op_threads"]))
    try:
        providers = [tuple(p) if isinstance(p, list) else p for p in job["providers"]]  # JSON made lists
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
        inputs = {arg.name: executor._spec(arg) for arg in session.get_inputs()}
        outputs = {arg.name: executor._spec(arg) for arg in session.get_outputs()}
    except LoadFailed as exc:
        return {"result": ERROR, "reason": exc.message}
    except Exception as exc:  # noqa: BLE001 - onnxruntime's refusal is the verdict
        text = str(exc)
        if _is_memory(text):
            return {"result": OUT_OF_MEMORY}
        text = _ORT_SOURCE.sub("", text.replace(path, "<artifact>"))
        return {"result": ERROR, "reason": text[:REASON_CHARS]}
    try:
        executor.warm_up_run(session, inputs, outputs, int(job["batch"]))  # the pod's own warm-up run
    except Exception as exc:  # noqa: BLE001 - dummy values may be rejected; the pod serves anyway
        if _is_memory(str(exc)):
            return {"result": OUT_OF_MEMORY}
    del session  # its destruction runs here too, not first in the pod
    return {"result": OK, "locations": list(checked.locations)}


# -- the zygote -------------------------------------------------------------------------------


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(2, 1)  # the zygote's stdout is the pod's pipe: never the child's
        try:
            _child(write_fd, job)
        finally:
            os._exit(70)
    os.close(write_fd)
    deadline = start + float(job["timeout_s"])
    chunks: list[bytes] = []
    size, timed_out, done = 0, False, False
    while not done:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_fd], [], [], left)
        if ready:
            chunk = os.read(read_fd, 65536)
            done = not chunk
            if chunk and size < REPLY_BYTES:
                chunks.append(chunk)
                size += len(chunk)
    os.close(read_fd)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    status = _reap(pid)
    reply: Any = None
    if chunks and not timed_out:
        try:
            reply = _bounded(json.loads(b"".join(chunks)[:REPLY_BYTES]))
        except ValueError:
            reply = None
    return {"reply": reply, "status": status, "timed_out": timed_out, "seconds": time.monotonic() - start}


def _bounded(reply: Any) -> dict[str, Any] | None:
    """Only the fields the pod reads, each bounded, so the answer line stays small whatever
    the child sent."""
    if not isinstance(reply, dict) or reply.get("result") not in RESULTS:
        return None
    locations = reply.get("locations", [])
    if not isinstance(locations, list):
        locations = []
    return {
        "result": reply["result"],
        "reason": str(reply.get("reason", ""))[:REASON_CHARS],
        "locations": [str(x)[:MAX_LOCATION_CHARS] for x in locations[:MAX_LOCATIONS]],
    }


def _reap(pid: int) -> int:
    """The child's exit status as multiprocessing writes it: -signal, or the exit code."""
    grace = time.monotonic() + _KILL_GRACE_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > grace:
            os.kill(pid, signal.SIGKILL)
            grace = float("inf")
        time.sleep(0.005)


def main() -> None:
    _die_with_parent()
    import numpy  # noqa: F401 - imported once here, inherited by every child
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    from puller import executor, onnxcheck  # noqa: F401

    onnxcheck.builtin_domains()
    out = sys.stdout
    out.write(READY + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            job = json.loads(line)
            answer = _run_job(job)
        except Exception as exc:  # noqa: BLE001 - a bad job must not end the zygote
            answer = {"reply": None, "status": 70, "timed_out": False, "seconds": 0.0,
                      "error": type(exc).__name__}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
