"""A watched, in-memory copy of everything under the mesh's etcd root.

The loop the brief asks us to own: list at a revision, watch from revision + 1, apply each
response idempotently by mod_revision (tombstones keep a replayed put of a deleted key out),
on compaction or a broken stream re-list and diff (deletes too), and re-list periodically as
a safety net. Listeners get the changed keys after each applied batch; `wait_for` lets
callers block until a predicate over the cache holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable, Iterable

from mesh.errors import Unavailable
from mesh.kv.etcd import Compacted, EtcdClient, Event

log = logging.getLogger(__name__)

Listener = Callable[[list[Event]], None]


@dataclasses.dataclass
class ViewStats:
    relists: int = 0
    batches: int = 0
    duplicate_events: int = 0


class View:
    def __init__(self, client: EtcdClient, prefix: str, relist_interval: float = 300.0) -> None:
        self.client = client
        self.prefix = prefix
        self.relist_interval = relist_interval
        self.revision = 0
        self.stats = ViewStats()
        self._data: dict[str, tuple[int, bytes]] = {}
        self._tombstones: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self._changed = asyncio.Condition()
        self._synced = asyncio.Event()
        # False from a broken watch until the next successful list: readers that must tell
        # "absent" from "not known right now" (NOT_FOUND vs UNAVAILABLE) check it.
        self.connected = False

    # -- reading ------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        return item[1] if item else None

    def items(self, prefix: str = "") -> Iterable[tuple[str, bytes]]:
        return [(k, v) for k, (_, v) in self._data.items() if k.startswith(prefix)]

    def revisions(self) -> dict[str, int]:
        """key -> mod_revision, for comparing the cache with a fresh list of etcd."""
        return {k: rev for k, (rev, _) in self._data.items()}

    def subscribe(self, listener: Listener) -> None:
        """`listener(events)` runs after each applied batch; it must be quick and not raise."""
        self._listeners.append(listener)

    # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a cancellation
    # that arrives as the awaited predicate comes true (it returns the result instead), and a
    # cancelled waiter in a retry loop then never stops (a stall the decider property found).
    async def wait_synced(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._synced.wait()

    async def wait_for(self, predicate: Callable[[], object], timeout: float | None) -> object:
        """Waits until predicate() is truthy (re-checked after every change); returns its value."""
        async with asyncio.timeout(timeout), self._changed:
            return await self._changed.wait_for(predicate)

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until cancelled. Survives etcd outages, compactions and broken streams."""
        backoff = 0.1
        while True:
            try:
                await self._relist()
                backoff = 0.1
                await self._watch()
            except Compacted as exc:
                log.info("watch of %s compacted at %d; re-listing", self.prefix, exc.compact_revision)
            except TimeoutError:
                pass  # periodic re-list
            except Unavailable as exc:
                self.connected = False
                log.warning("watch of %s interrupted: %s", self.prefix, exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)

    async def _watch(self) -> None:
        async with asyncio.timeout(self.relist_interval):
            async for batch in self.client.watch_prefix(self.prefix, self.revision + 1):
                await self._apply(batch.events, batch.revision)

    async def _relist(self) -> None:
        kvs, revision = await self.client.get_prefix(self.prefix)
        fresh = {kv.key: (kv.mod_revision, kv.value) for kv in kvs}
        events: list[Event] = []
        for key, (rev, value) in fresh.items():
            old = self._data.get(key)
            if old is None or old[0] != rev:
                events.append(Event(key, value, rev))
        for key in self._data.keys() - fresh.keys():
            events.append(Event(key, None, revision))
        self._data = fresh
        self._tombstones.clear()
        self.stats.relists += 1
        await self._publish(events, revision)
        self.connected = True
        self._synced.set()

    async def _apply(self, events: Iterable[Event], revision: int) -> None:
        applied: list[Event] = []
        for ev in events:
            current = self._data.get(ev.key)
            seen = max(current[0] if current else 0, self._tombstones.get(ev.key, 0))
            if ev.mod_revision <= seen:
                self.stats.duplicate_events += 1
                continue
            if ev.value is None:
                self._data.pop(ev.key, None)
                self._tombstones[ev.key] = ev.mod_revision
            else:
                self._data[ev.key] = (ev.mod_revision, ev.value)
                self._tombstones.pop(ev.key, None)
            applied.append(ev)
        self.stats.batches += 1
        await self._publish(applied, revision)

    async def _publish(self, events: list[Event], revision: int) -> None:
        self.revision = max(self.revision, revision)
        if events:
            for listener in self._listeners:
                try:
                    listener(events)
                except Exception:  # a listener bug must not stop the watch
                    log.exception("view listener failed")
        async with self._changed:
            self._changed.notify_all()
