"""Leader election over an etcd lease, and the fence every leader write goes through.

A replica grants a lease (kept alive every TTL/3) and campaigns with one transaction: create
`leader/placement` only if it does not exist, attached to the lease. The winner remembers the
key's create revision — the fence. Every write the leader makes is a transaction that also
compares the leader key's create revision with the fence, so a replica that lost leadership
without noticing (paused, partitioned, lease expired) can never overwrite its successor's
decisions. Losing that compare, the lease, or seeing the key change hands ⇒ step down at once
and campaign again. Followers wait (on the watched MeshState, re-checking every TTL) until
the key is gone. Shutdown revokes the lease so a standby takes over without waiting the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from aetcd.rpc import rpc_pb2

from mesh import types
from mesh.clock import Clock, SystemClock
from mesh.errors import Unavailable
from mesh.kv import keys as k
from mesh.kv.etcd import CREATE, MAX_TXN_OPS, EtcdClient, Lease, compare, put_op
from mesh.metrics import Metrics
from mesh.state import MeshState

log = logging.getLogger(__name__)


class Leader:
    def __init__(
        self,
        client: EtcdClient,
        state: MeshState,
        holder_id: str,
        address: str,
        ttl_s: int,
        metrics: Metrics,
        clock: Clock | None = None,
    ) -> None:
        self.client = client
        self.state = state
        self.key = state.keys.leader()
        self.holder_id = holder_id
        self.address = address
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.fence = 0  # create revision of our leader key while we lead, else 0
        self.became_leader = asyncio.Event()  # set on each win; the controller clears it
        self._deposed = asyncio.Event()
        self._check = asyncio.Event()
        state.on_change(self._on_change)

    @property
    def is_leader(self) -> bool:
        return self.fence != 0

    # -- the election loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Campaigns until cancelled; on cancel, steps down and revokes the lease (resign)."""
        backoff = 0.2
        while True:
            lease: Lease | None = None
            keep_alive: asyncio.Task[None] | None = None
            try:
                lease = await self.client.grant(self.ttl_s)
                keep_alive = asyncio.create_task(lease.keep_alive(), name="placement-leader-lease")
                await self._campaign_while(lease)
                backoff = 0.2
            except Unavailable as exc:
                log.warning("leader election interrupted: %s; retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self._step_down("lease lost or shutting down")
                if keep_alive is not None:
                    keep_alive.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await keep_alive
                if lease is not None:
                    await self._revoke(lease)

    async def _campaign_while(self, lease: Lease) -> None:
        """Campaigns, leads and waits with this lease until it is lost."""
        while not lease.lost.is_set():
            if await self._campaign(lease):
                await self._lead(lease)
            else:
                await self._follow(lease)

    async def _campaign(self, lease: Lease) -> bool:
        record = types.LeaderRecord(self.holder_id, self.address, self.clock.unix_ms())
        won, revision = await self.client.txn(
            [compare(self.key, CREATE, 0)], [put_op(self.key, types.encode(record), lease.id)]
        )
        if won:
            self._become_leader(revision)  # the put is the txn's only write: its revision
            return True
        current = await self.client.get(self.key)
        if current is not None and current.lease == lease.id:
            # Our own key, written by an earlier campaign we stepped down from on stale news.
            self._become_leader(current.create_revision)
            return True
        return False

    def _become_leader(self, fence: int) -> None:
        self.fence = fence
        self._deposed.clear()
        self._check.clear()
        self.metrics.is_leader.set(1)
        self.became_leader.set()
        log.info("%s is the placement leader (fence %d)", self.holder_id, fence)

    async def _lead(self, lease: Lease) -> None:
        """Returns when leadership ended: lease lost, fence lost, or the key changed hands."""
        while self.is_leader and not lease.lost.is_set():
            await _first(lease.lost.wait(), self._deposed.wait(), self._check.wait())
            if self._check.is_set() and not self._deposed.is_set() and not lease.lost.is_set():
                self._check.clear()
                current = await self.client.get(self.key)
                if current is None or current.create_revision != self.fence:
                    self._step_down("the leader key was deleted or replaced")
        self._step_down("lease lost" if lease.lost.is_set() else "deposed")

    async def _follow(self, lease: Lease) -> None:
        """Waits until the leader key looks free (or a TTL passes), then returns to campaign."""
        if self.state.leader is None:
            await asyncio.sleep(0.1)  # our view lags behind etcd: don't spin on failed campaigns
        with contextlib.suppress(TimeoutError):
            await _first(
                lease.lost.wait(),
                self.state.wait_for(lambda: self.state.leader is None, timeout=float(self.ttl_s)),
            )

    def _step_down(self, why: str) -> None:
        if self.fence:
            log.warning("%s steps down as placement leader: %s", self.holder_id, why)
        self.fence = 0
        self._deposed.set()
        self.metrics.is_leader.set(0)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        if section == k.LEADER and self.is_leader:
            self._check.set()  # verify against etcd: the view may lag behind our own win

    async def _revoke(self, lease: Lease) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(lease.revoke()), 2.0)
        except (Unavailable, TimeoutError, asyncio.CancelledError) as exc:
            log.warning("could not revoke leader lease %x (%r); it expires by itself", lease.id, exc)

    # -- fenced writes --------------------------------------------------------------------------

    async def write(
        self, ops: Sequence[rpc_pb2.RequestOp], extra_compares: Sequence[rpc_pb2.Compare] = ()
    ) -> bool:
        """Applies `ops` in one transaction only while we lead; False when not applied.

        A failed transaction is told apart (one read): if our fence no longer holds we step
        down; otherwise one of `extra_compares` failed and we still lead.
        """
        if len(ops) > MAX_TXN_OPS:
            raise ValueError(f"{len(ops)} operations in one transaction; etcd allows {MAX_TXN_OPS}")
        fence = self.fence
        if not fence:
            return False
        ok, _ = await self.client.txn([compare(self.key, CREATE, fence), *extra_compares], ops)
        if ok:
            return True
        current = await self.client.get(self.key)
        if current is None or current.create_revision != fence:
            if self.fence == fence:
                self._step_down("a fenced write found another leader")
        return False


async def _first(*aws: object) -> None:
    """Waits for the first awaitable to finish; cancels (and awaits) the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
