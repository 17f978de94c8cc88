"""mesh.kv.view against a real etcd of its own (these tests compact it): the owned
list/watch loop converges after a watch gap with compaction (RELIABILITY F10), reports
deletes found by a re-list, and applies replayed events at most once."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from mesh.kv.etcd import Compacted, EtcdClient, Event
from mesh.kv.view import View

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix() -> str:
    return f"/view-{uuid.uuid4().hex[:8]}/"


async def _fresh(client: EtcdClient, prefix: str) -> dict[str, int]:
    kvs, _ = await client.get_prefix(prefix)
    return {kv.key: kv.mod_revision for kv in kvs}


def test_frozen_view_converges_after_a_thousand_changes_and_a_compaction(private_etcd: str, prefix: str) -> None:
    """The view's event loop is blocked (a listener that waits, like a paused process) while
    1,000 changes are written (puts, overwrites, deletes of keys it had seen) and etcd is
    compacted past them; once it runs again its cache equals a fresh list of etcd, whichever
    way etcd catches it up (here: the events it had buffered for the watch; a watch broken
    meanwhile would re-list, and one resumed at a compacted revision is the next test)."""
    frozen, thaw = threading.Event(), threading.Event()
    deleted_seen: set[str] = set()
    freeze_key = prefix + "freeze"

    def listener(events: list[Event]) -> None:
        for ev in events:
            if ev.value is None:
                deleted_seen.add(ev.key)
            elif ev.key == freeze_key and not frozen.is_set():
                frozen.set()
                thaw.wait(60)  # blocks the view's whole event loop

    view_loop = asyncio.new_event_loop()
    state: dict[str, object] = {}

    async def view_main(ready: threading.Event) -> None:
        client = EtcdClient([private_etcd], timeout=5)
        view = View(client, prefix)
        view.subscribe(listener)
        state["view"] = view
        task = asyncio.ensure_future(view.run())
        await view.wait_synced(10)
        ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            task.cancel()
            await client.close()

    ready = threading.Event()
    runner = threading.Thread(target=lambda: _run_until_cancelled(view_loop, view_main(ready)), daemon=True)
    runner.start()
    assert ready.wait(20), "view never synced"
    view: View = state["view"]  # type: ignore[assignment]

    async def revisions() -> dict[str, int]:  # read on the view's own loop, not across threads
        async def read() -> dict[str, int]:
            return view.revisions()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(read(), view_loop))

    async def converged(target: dict[str, int] | int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while True:
                current = await revisions()
                if (len(current) if isinstance(target, int) else current) == target:
                    return
                await asyncio.sleep(0.02)

    async def drive() -> tuple[dict[str, int], set[str]]:
        client = EtcdClient([private_etcd], timeout=10)
        try:
            for i in range(100):
                await client.put(f"{prefix}old/{i:03d}", b"v0")
            await converged(100)
            await client.put(freeze_key, b"1")
            await asyncio.to_thread(frozen.wait, 20)
            assert frozen.is_set(), "the listener never ran for the freeze key"
            removed = {f"{prefix}old/{i:03d}" for i in range(0, 100, 2)}
            for key in sorted(removed):  # 50 deletes of keys the view holds
                await client.delete(key)
            for i in range(1, 100, 2):  # 50 overwrites
                await client.put(f"{prefix}old/{i:03d}", b"v1")
            for i in range(900):  # 900 puts of new keys, 300 of them deleted again
                await client.put(f"{prefix}new/{i % 600:03d}", b"x" * 64)
            for i in range(0, 600, 2):
                await client.delete(f"{prefix}new/{i:03d}")
            _, revision = await client.get_prefix(prefix)
            await client.compact(revision)
            thaw.set()
            fresh = await _fresh(client, prefix)
            await converged(fresh, 20)
            return fresh, removed
        finally:
            thaw.set()
            await client.close()

    try:
        fresh, removed = asyncio.run(drive())
        # The view's loop is idle now (converged); its state is read after the last change.
        assert removed <= deleted_seen  # every delete reached listeners, by watch or by re-list diff
        assert not any(k in view.revisions() for k in removed)
        assert view.get(f"{prefix}old/001") == b"v1"
    finally:
        view_loop.call_soon_threadsafe(_cancel_all, view_loop)
        runner.join(10)


def test_compacted_start_revision_raises_and_the_relist_reports_deletes(private_etcd: str, prefix: str) -> None:
    async def main() -> None:
        client = EtcdClient([private_etcd], timeout=5)
        try:
            await client.put(prefix + "a", b"1")
            await client.put(prefix + "b", b"1")
            view = View(client, prefix)
            seen: list[Event] = []
            view.subscribe(seen.extend)
            task = asyncio.ensure_future(view.run())
            await view.wait_synced(10)
            task.cancel()  # the watch gap
            stale = view.revision
            await client.delete(prefix + "a")
            await client.put(prefix + "c", b"1")
            _, revision = await client.get_prefix(prefix)
            await client.compact(revision)
            with pytest.raises(Compacted) as err:
                async for _ in client.watch_prefix(prefix, stale + 1):
                    pass
            assert err.value.compact_revision >= revision
            seen.clear()
            relists = view.stats.relists
            fresh = await _fresh(client, prefix)
            task = asyncio.ensure_future(view.run())  # resumes by re-listing and diffing
            try:
                await view.wait_for(lambda: view.revisions() == fresh, 10)
            finally:
                task.cancel()
            assert view.stats.relists == relists + 1
            assert {(e.key, e.value) for e in seen} == {(prefix + "a", None), (prefix + "c", b"1")}
        finally:
            await client.close()

    asyncio.run(main())


def test_replayed_events_apply_at_most_once(private_etcd: str, prefix: str) -> None:
    """Replaying a window of 67 already-applied events (a watch resumed too far back, as
    after a lost response) changes nothing."""

    async def main() -> None:
        client = EtcdClient([private_etcd], timeout=5)
        try:
            view = View(client, prefix)
            task = asyncio.ensure_future(view.run())
            await view.wait_synced(10)
            start = view.revision + 1
            for i in range(60):
                await client.put(f"{prefix}k{i % 20}", str(i).encode())
            for i in range(0, 20, 3):
                await client.delete(f"{prefix}k{i}")
            fresh = await _fresh(client, prefix)
            await view.wait_for(lambda: view.revisions() == fresh, 10)
            applied: list[Event] = []
            view.subscribe(applied.extend)
            duplicates = view.stats.duplicate_events
            await asyncio.wait_for(_replay(client, view, prefix, start, count=67), 10)
            task.cancel()
            assert view.revisions() == fresh
            assert applied == []  # nothing re-applied, not even the deletes (tombstones)
            assert view.stats.duplicate_events - duplicates == 67  # 60 puts + 7 deletes replayed
        finally:
            await client.close()

    asyncio.run(main())


async def _replay(client: EtcdClient, view: View, prefix: str, start: int, count: int) -> None:
    replayed = 0
    async for batch in client.watch_prefix(prefix, start):
        await view._apply(batch.events, batch.revision)  # the loop's own apply step
        replayed += len(batch.events)
        if replayed >= count:
            return


def _run_until_cancelled(loop: asyncio.AbstractEventLoop, main) -> None:  # noqa: ANN001
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()
