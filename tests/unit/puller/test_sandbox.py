"""puller.sandbox: first loads in a throw-away child (real zygote and child processes), each
verdict and its reason, the limits deciding, the verdict cache in memory and on disk, and the
executor refusing what the sandbox refused.

The crash case is a test hook, not an onnxruntime bug: no model found crashes onnxruntime
1.31 (malformed sparse initializers, short raw_data, broken Loop bodies all fail cleanly), so
a model whose producer_name matches TEST_CRASH_ENV makes the child call os.abort() - the
same SIGABRT a crashing onnxruntime would die of.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import stat
from collections.abc import AsyncIterator, Callable

import numpy as np
import onnx
import pytest

from mesh import demo
from mesh.errors import LoadFailed
from mesh.metrics import Metrics
from puller import sandbox as sandbox_mod
from puller.executor import Executor
from puller.sandbox import Sandbox
from tests import badmodels

CPU = ["CPUExecutionProvider"]
SMALL = 64 << 20


def _save(model: onnx.ModelProto, folder: pathlib.Path) -> pathlib.Path:
    return demo.save(model, folder / "model.onnx")


@pytest.fixture
async def make(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Sandbox]]:
    monkeypatch.setenv(sandbox_mod.TEST_CRASH_ENV, badmodels.CRASH_PRODUCER)
    made: list[Sandbox] = []

    def build(memory: int = 1 << 30, timeout_s: float = 30.0, verdicts: pathlib.Path | None = None,
              enabled: bool = True, metrics: Metrics | None = None) -> Sandbox:
        box = Sandbox(memory, timeout_s, verdicts, 1, CPU, enabled=enabled, metrics=metrics)
        made.append(box)
        return box

    yield build
    for box in made:
        box.close()


async def test_good_model_is_ok_and_reports_its_external_files(make: Callable[..., Sandbox], tmp_path: pathlib.Path) -> None:
    (tmp_path / "w.bin").write_bytes(np.array([1.0], np.float32).tobytes())
    box = make()
    verdict = await box.vet(str(_save(badmodels.external_model("w.bin"), tmp_path)), 1)
    assert verdict.ok and verdict.locations == ("w.bin",) and box.children == 1


async def test_unbounded_allocation_is_out_of_memory_and_the_limit_decides(
    make: Callable[..., Sandbox], tmp_path: pathlib.Path
) -> None:
    path = str(_save(badmodels.expand_model(1 << 25), tmp_path))  # 128 MiB on warm-up
    verdict = await make(memory=SMALL).vet(path, 1)
    assert verdict.result == sandbox_mod.OUT_OF_MEMORY
    assert "ran out of memory on its first load" in verdict.message("m")
    assert "MESH_RUNTIME_SANDBOX_MEMORY_BYTES" in verdict.reason
    assert (await make(memory=1 << 30).vet(path, 1)).ok  # the same model under a larger limit


async def test_endless_load_times_out(make: Callable[..., Sandbox], tmp_path: pathlib.Path) -> None:
    verdict = await make(timeout_s=1.0).vet(str(_save(badmodels.endless_model(), tmp_path)), 1)
    assert verdict.result == sandbox_mod.TIMED_OUT
    assert "within 1s (MESH_RUNTIME_SANDBOX_TIMEOUT_S)" in verdict.message("m")


async def test_crash_in_the_child_is_crashed_by_signal(make: Callable[..., Sandbox], tmp_path: pathlib.Path) -> None:
    box = make()
    verdict = await box.vet(str(_save(badmodels.crash_model(), tmp_path)), 1)
    assert verdict.result == sandbox_mod.CRASHED and "SIGABRT" in verdict.reason
    assert "crashed onnxruntime" in verdict.message("m")
    ok = tmp_path / "ok"
    assert (await box.vet(str(_save(demo.linear_model(1), ok)), 1)).ok  # the zygote serves on


async def test_graph_checks_run_in_the_child(make: Callable[..., Sandbox], tmp_path: pathlib.Path) -> None:
    box = make()
    for name, model, reason in [
        ("custom", badmodels.custom_op_model(), "custom-op domain 'com.evil'"),
        ("passwd", badmodels.external_model("../../etc/passwd"), "contains '..'"),
        ("absolute", badmodels.external_model("/etc/passwd"), "is absolute"),
        ("huge", badmodels.huge_declared_model(), "more than a load may use"),
    ]:
        verdict = await box.vet(str(_save(model, tmp_path / name)), 1)
        assert verdict.result == sandbox_mod.REFUSED, name
        assert reason in verdict.reason and verdict.message(name).startswith(f"cannot load model '{name}': ")


async def test_onnxruntime_error_has_no_path(make: Callable[..., Sandbox], tmp_path: pathlib.Path) -> None:
    model = badmodels.huge_declared_model(1000)
    model.graph.initializer[0].raw_data = b"\0" * 4  # 4 bytes for 1,000 floats
    verdict = await make().vet(str(_save(model, tmp_path)), 1)
    assert verdict.result == sandbox_mod.ERROR and "raw_data" in verdict.reason
    assert str(tmp_path) not in verdict.reason and "/onnxruntime_src/" not in verdict.reason


async def test_verdicts_are_cached_per_sha256_in_memory_and_on_disk(
    make: Callable[..., Sandbox], tmp_path: pathlib.Path
) -> None:
    verdicts = tmp_path / "verdicts"
    good = str(_save(demo.linear_model(1), tmp_path / "good"))
    bad = str(_save(badmodels.crash_model(), tmp_path / "bad"))
    same = str(_save(demo.linear_model(1), tmp_path / "copy"))  # the same bytes elsewhere
    metrics = Metrics()
    box = make(verdicts=verdicts, metrics=metrics)
    assert (await box.vet(good, 1)).ok and not (await box.vet(bad, 1)).ok
    assert box.children == 2
    assert (await box.vet(good, 1)).ok and (await box.vet(same, 1)).ok
    assert (await box.vet(bad, 1)).result == sandbox_mod.CRASHED
    assert box.children == 2  # neither vetted again
    assert metrics.sandbox_verdict_hits._value.get() == 3
    files = sorted(verdicts.iterdir())
    assert len(files) == 2 and stat.S_IMODE(verdicts.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)

    restarted = make(verdicts=verdicts)  # a new pod process on the same disk
    assert (await restarted.vet(good, 1)).ok
    assert (await restarted.vet(bad, 1)).result == sandbox_mod.CRASHED
    assert restarted.children == 0

    larger = make(memory=2 << 30, verdicts=verdicts)  # a changed limit vets again
    assert (await larger.vet(good, 1)).ok and larger.children == 1
    assert (await larger.vet(good, 8)).ok and larger.children == 2  # and so does another batch


async def test_given_sha256_is_the_key(make: Callable[..., Sandbox], tmp_path: pathlib.Path) -> None:
    box = make()
    path = str(_save(demo.linear_model(1), tmp_path))
    await box.vet(path, 1, "a" * 64)
    await box.vet(path, 1, "a" * 64)
    await box.vet(path, 1, "b" * 64)
    assert box.children == 2


async def test_cancelled_vet_kills_the_child_and_caches_nothing(
    make: Callable[..., Sandbox], tmp_path: pathlib.Path
) -> None:
    box = make(timeout_s=600.0)
    await box.start()
    await box.started()
    endless = str(_save(badmodels.endless_model(), tmp_path / "endless"))
    task = asyncio.create_task(box.vet(endless, 1))
    for _ in range(3000):  # until the child is started (bounded)
        if box.children:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the job is on its way to the zygote
    zygote = box._zygote
    assert zygote is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert zygote.poll() is not None  # the zygote went, and its child with it
    assert box.store.get(box._digest(endless), box.context(1)) is None
    assert (await box.vet(str(_save(demo.linear_model(1), tmp_path / "ok")), 1)).ok  # a fresh zygote


async def test_a_dead_zygote_is_replaced(make: Callable[..., Sandbox], tmp_path: pathlib.Path) -> None:
    box = make()
    await box.start()
    await box.started()
    assert box._zygote is not None
    os.kill(box._zygote.pid, signal.SIGKILL)
    box._zygote.wait()
    assert (await box.vet(str(_save(demo.linear_model(1), tmp_path)), 1)).ok


async def test_executor_refuses_what_the_sandbox_refused(make: Callable[..., Sandbox], tmp_path: pathlib.Path) -> None:
    executor = Executor(1, 1, cuda=False, sandbox=make(memory=SMALL))
    try:
        with pytest.raises(LoadFailed, match="model 'boom' crashed onnxruntime"):
            await executor.load("boom", str(_save(badmodels.crash_model(), tmp_path / "boom")))
        model = await executor.load("good", str(_save(demo.linear_model(1), tmp_path / "good")))
        (out,) = await executor.run(model, {"input": np.ones((1, 4), np.float32)}, ["output"])
        assert out.shape == (1, 3)
    finally:
        executor.close()


async def test_executor_rechecks_external_files_after_a_cached_verdict(
    make: Callable[..., Sandbox], tmp_path: pathlib.Path
) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(np.array([1.0], np.float32).tobytes())
    path = str(_save(badmodels.external_model("w.bin"), tmp_path))
    executor = Executor(1, 1, cuda=False, sandbox=make())
    try:
        await executor.load("ext", path)
        weights.unlink()
        weights.symlink_to("/etc/passwd")  # swapped after the verdict: same .onnx sha256
        with pytest.raises(LoadFailed, match="cannot load model 'ext'.*resolves outside"):
            await executor.load("ext", path)
    finally:
        executor.close()


async def test_sandbox_off_still_checks_the_graph_in_process(make: Callable[..., Sandbox], tmp_path: pathlib.Path) -> None:
    box = make(enabled=False)
    executor = Executor(1, 1, cuda=False, sandbox=box)
    try:
        with pytest.raises(LoadFailed, match="cannot load model 'c'.*custom-op domain"):
            await executor.load("c", str(_save(badmodels.custom_op_model(), tmp_path)))
        assert box.children == 0
    finally:
        executor.close()
