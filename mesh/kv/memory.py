"""An in-memory etcd for unit tests: a `Store` (mesh/kv/store.py) with etcd's revision model.

Every write that changes something takes the next revision; each key keeps its create and mod
revision and version; transactions evaluate compares (single keys and ranges, every target and
result etcd has) and apply their operations at one revision. Watches replay history from any
revision not compacted away and raise Compacted otherwise, like etcd.

The point is the watch LAG a real etcd has between a write being acknowledged and a watcher
seeing it, which is what double-booking bugs hide behind. A revision becomes visible to
watchers `lag` seconds after its commit (`lag` may be a callable drawn per write: random lags),
never out of order; or, with `hold()`, only when the test calls `release(...)`, so a test can
interleave writes and deliveries exactly. Reads (get, get_prefix, txn) always see the latest
state, as etcd's linearizable reads do.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

from aetcd.rpc import rpc_pb2

from mesh.errors import Conflict, Unavailable
from mesh.kv.etcd import KV, Compacted, Event, WatchBatch

Lag = float | Callable[[], float]

_C = rpc_pb2.Compare


@dataclasses.dataclass
class _Item:
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class MemoryStore:
    def __init__(self, lag: Lag = 0.0) -> None:
        self.revision = 1  # an empty etcd answers revision 1
        self.compacted = 0
        self.lag = lag
        self.writes = 0  # committed write transactions (puts, deletes, txns that changed something)
        self._items: dict[str, _Item] = {}
        self._history: list[tuple[int, tuple[Event, ...]]] = []  # (revision, events), ascending
        self._visible = 1  # watchers see revisions up to here
        self._held = False
        self._changed = asyncio.Condition()
        self._broken = 0  # bumped by break_watches(): running watches raise Unavailable
        self._next_lease = 1
        self._timers: set[asyncio.TimerHandle] = set()

    # -- test controls ------------------------------------------------------------------------

    def hold(self) -> None:
        """Stops delivering watch events until `release`."""
        self._held = True

    def release(self, upto: int | None = None) -> None:
        """Lets watchers see revisions up to `upto` (default: all); keeps holding after that
        only if `upto` was given."""
        if upto is None:
            self._held = False
            upto = self.revision
        self._show(upto)

    def release_next(self) -> bool:
        """Lets watchers see the next committed revision they have not seen; False if none."""
        i = bisect.bisect_right([r for r, _ in self._history], self._visible)
        if i >= len(self._history):
            return False
        self._show(self._history[i][0])
        return True

    @property
    def pending(self) -> int:
        """Committed revisions watchers have not seen yet."""
        return sum(1 for r, _ in self._history if r > self._visible)

    def break_watches(self) -> None:
        """Every running watch raises Unavailable (a broken stream): watchers re-list."""
        self._broken += 1
        self._notify()

    def snapshot(self, prefix: str = "") -> dict[str, bytes]:
        """The current values under `prefix` (synchronous, for assertions)."""
        return {k: it.value for k, it in sorted(self._items.items()) if k.startswith(prefix)}

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    # -- reads --------------------------------------------------------------------------------

    def _kv(self, key: str, item: _Item) -> KV:
        return KV(key, item.value, item.mod_revision, item.create_revision, item.lease)

    async def get(self, key: str) -> KV | None:
        item = self._items.get(key)
        return self._kv(key, item) if item else None

    async def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        kvs = [self._kv(k, it) for k, it in sorted(self._items.items()) if k.startswith(prefix)]
        return kvs, self.revision

    # -- writes -------------------------------------------------------------------------------

    def put_now(self, key: str, value: bytes, lease: int = 0) -> int:
        """`put` without awaiting, for test set-up (the same commit and watch lag)."""
        self._commit([("put", key, value, lease)])
        return self.revision

    def delete_now(self, key: str) -> None:
        self._commit([("delete", key, b"", 0)])

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self._commit([("put", key, value, lease)])
        return self.revision

    async def delete(self, key: str) -> int:
        existed = key in self._items
        self._commit([("delete", key, b"", 0)])
        return int(existed)

    async def delete_prefix(self, prefix: str) -> int:
        keys = [k for k in self._items if k.startswith(prefix)]
        self._commit([("delete", k, b"", 0) for k in keys])
        return len(keys)

    async def create(self, key: str, value: bytes, lease: int = 0) -> int:
        if key in self._items:
            raise Conflict(f"key exists: {key}")
        return await self.put(key, value, lease)

    async def txn(
        self,
        compares: Sequence[rpc_pb2.Compare],
        success: Sequence[rpc_pb2.RequestOp],
        failure: Sequence[rpc_pb2.RequestOp] = (),
    ) -> tuple[bool, int]:
        ok = all(self._holds(c) for c in compares)
        changes: list[tuple[str, str, bytes, int]] = []
        for op in success if ok else failure:
            if op.HasField("request_put"):
                p = op.request_put
                changes.append(("put", p.key.decode(), p.value, p.lease))
            elif op.HasField("request_delete_range"):
                d = op.request_delete_range
                for key in self._range(d.key, d.range_end):
                    changes.append(("delete", key, b"", 0))
        keys = [c[1] for c in changes if c[0] == "put"]
        if len(keys) != len(set(keys)):
            raise Unavailable("etcd: duplicate key given in txn request")
        self._commit(changes)
        return ok, self.revision

    async def compact(self, revision: int) -> None:
        self.compacted = max(self.compacted, revision)
        self._history = [(r, evs) for r, evs in self._history if r >= revision]
        self._notify()

    async def grant(self, ttl: int) -> int:
        self._next_lease += 1
        return self._next_lease

    async def revoke(self, lease_id: int) -> None:
        """Deletes every key attached to the lease (a process dying)."""
        keys = [k for k, it in self._items.items() if it.lease == lease_id]
        self._commit([("delete", k, b"", 0) for k in keys])

    def _range(self, key: bytes, range_end: bytes) -> list[str]:
        if not range_end:
            k = key.decode()
            return [k] if k in self._items else []
        start = key.decode()
        end = None if range_end == b"\0" else range_end
        return sorted(k for k in self._items if k >= start and (end is None or k.encode() < end))

    def _holds(self, cmp: rpc_pb2.Compare) -> bool:
        keys = self._range(cmp.key, cmp.range_end) if cmp.range_end else [cmp.key.decode()]
        items = [self._items.get(k) for k in keys] or [None]
        return all(self._compare_one(cmp, item) for item in items)

    @staticmethod
    def _compare_one(cmp: rpc_pb2.Compare, item: _Item | None) -> bool:
        target = cmp.target
        if target == _C.VALUE:
            if item is None:
                return False  # etcd: a value compare on an absent key fails
            have: object = item.value
            want: object = cmp.value
        elif target == _C.CREATE:
            have, want = (item.create_revision if item else 0), cmp.create_revision
        elif target == _C.MOD:
            have, want = (item.mod_revision if item else 0), cmp.mod_revision
        elif target == _C.VERSION:
            have, want = (item.version if item else 0), cmp.version
        else:  # LEASE
            have, want = (item.lease if item else 0), cmp.lease
        result = cmp.result
        if result == _C.EQUAL:
            return have == want
        if result == _C.NOT_EQUAL:
            return have != want
        if result == _C.GREATER:
            return have > want  # type: ignore[operator]
        return have < want  # type: ignore[operator]

    def _commit(self, changes: list[tuple[str, str, bytes, int]]) -> None:
        events: list[Event] = []
        rev = self.revision + 1
        for kind, key, value, lease in changes:
            if kind == "put":
                old = self._items.get(key)
                self._items[key] = _Item(value, old.create_revision if old else rev, rev,
                                         (old.version if old else 0) + 1, lease)
                events.append(Event(key, value, rev))
            elif self._items.pop(key, None) is not None:
                events.append(Event(key, None, rev))
        if not events:
            return
        self.revision = rev
        self.writes += 1
        self._history.append((rev, tuple(events)))
        if self._held:
            return
        lag = self.lag() if callable(self.lag) else self.lag
        if lag <= 0:
            self._show(rev)
            return
        timer = asyncio.get_running_loop().call_later(lag, self._show, rev)
        self._timers.add(timer)

    def _show(self, rev: int) -> None:
        # Revisions are shown in order: showing `rev` shows every earlier one too.
        if rev > self._visible:
            self._visible = rev
            self._notify()

    def _notify(self) -> None:
        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        try:
            asyncio.get_running_loop().create_task(wake())
        except RuntimeError:
            pass  # no loop running: nobody can be waiting

    # -- watch --------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        """One batch per revision with events under `prefix`, as the revisions become visible."""
        broken = self._broken
        next_rev = max(start_revision, 1)
        while True:
            if next_rev <= self.compacted:
                raise Compacted(self.compacted)
            async with self._changed:
                def caught_up(want: int = next_rev) -> bool:
                    return self._broken != broken or want <= self.compacted or self._visible >= want

                await self._changed.wait_for(caught_up)
            if self._broken != broken:
                raise Unavailable("memory store: watch stream broken")
            if next_rev <= self.compacted:
                raise Compacted(self.compacted)
            visible = self._visible
            i = bisect.bisect_left([r for r, _ in self._history], next_rev)
            for rev, events in self._history[i:]:
                if rev > visible:
                    break
                mine = tuple(ev for ev in events if ev.key.startswith(prefix))
                if mine:
                    yield WatchBatch(mine, rev)
            next_rev = visible + 1
