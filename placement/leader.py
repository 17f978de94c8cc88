"""Leader election over an etcd lease, and the fence every leader write goes through.

A replica grants a lease (kept alive every TTL/3) and campaigns with one transaction: create
`leader/placement` only if it does not exist, attached to the lease. The winner remembers the
key's create revision — the fence. Every write the leader makes is a transaction that also
compares the leader key's create revision with the fence, so a replica that lost leadership
without noticing (paused, partitioned, lease expired) can never overwrite its successor's
decisions. Losing that compare, the lease (or renewals failing long enough that etcd may have
let it expire), or seeing the key change hands ⇒ step down at once and campaign again; a
lease that comes back after an etcd outage or restart makes us leader again at once. Followers wait (on the watched MeshState, re-checking every TTL) until
the key is gone. Shutdown revokes the lease so a standby takes over without waiting the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from aetcd.rpc import rpc_pb2

from mesh import types
from mesh.clock import Clock, SystemClock
from mesh.errors import LeaseNotFound, MeshError, Unavailable
from mesh.kv import keys as k
from mesh.kv.etcd import CREATE, MAX_TXN_OPS, EtcdClient, Lease, compare, put_op
from mesh.metrics import Metrics
from mesh.state import MeshState

log = logging.getLogger(__name__)

REVOKE_TIMEOUT_S = 2.0
WARN_EVERY_S = 30.0


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
        self._last_warning, self._last_warning_at = "", 0.0
        state.on_change(self._on_change)

    @property
    def is_leader(self) -> bool:
        return self.fence != 0

    # -- the election loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Campaigns until cancelled; on cancel, steps down and revokes the lease (resign).

        While etcd is unreachable the lease is kept, not abandoned: once renewals fail past the
        point where etcd may have let it expire we step down, and keep renewing. etcd keeps
        leases through its own restart, so when it answers again the lease is normally still
        there and we lead again at once with the same fence (our key is still ours); if etcd
        says the lease is gone, a new one is granted and we campaign at once.
        """
        lease: Lease | None = None
        keep_alive: asyncio.Task[None] | None = None
        backoff = 0.2
        try:
            while True:
                try:
                    if lease is None or lease.lost.is_set() or (keep_alive is not None and keep_alive.done()):
                        await _stop(keep_alive)
                        lease, keep_alive = None, None
                        lease = await self.client.grant(self.ttl_s)
                        keep_alive = asyncio.create_task(lease.keep_alive(), name="placement-leader-lease")
                    if lease.doubtful.is_set():
                        # etcd may have let the lease expire: wait for its verdict. The timeout
                        # only re-checks the keep-alive task (a crashed one means a new lease).
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.ttl_s):
                                await _first(lease.alive.wait(), lease.lost.wait())
                        continue
                    await self._campaign_while(lease)
                    backoff = 0.2
                except Unavailable as exc:
                    if isinstance(exc, LeaseNotFound) and lease is not None:
                        lease.expired()  # a campaign named a lease etcd no longer has
                    self._step_down(f"etcd: {exc.message}")
                    self._warn(f"leader election interrupted: {exc.message}; retrying")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)  # etcd back => campaigning again within ~1 s
        finally:
            self._step_down("shutting down")
            await _stop(keep_alive)
            if lease is not None and not lease.lost.is_set():
                await self._revoke(lease)

    def _warn(self, message: str) -> None:
        """The first of a run of identical warnings, then one every WARN_EVERY_S at most."""
        now = time.monotonic()
        if message != self._last_warning or now - self._last_warning_at >= WARN_EVERY_S:
            log.warning("%s", message)
            self._last_warning, self._last_warning_at = message, now

    async def _campaign_while(self, lease: Lease) -> None:
        """Campaigns, leads and waits with this lease until it is in doubt or lost."""
        while not lease.doubtful.is_set():
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
        """Returns when leadership ended: lease in doubt or lost, fence lost, or the key changed
        hands. Stepping down on doubt (before etcd can expire the lease) keeps a leader cut off
        from etcd from acting; the fence stops it anyway should it write."""
        while self.is_leader and not lease.doubtful.is_set():
            await _first(lease.doubtful.wait(), self._deposed.wait(), self._check.wait())
            if self._check.is_set() and not self._deposed.is_set() and not lease.doubtful.is_set():
                self._check.clear()
                current = await self.client.get(self.key)
                if current is None or current.create_revision != self.fence:
                    self._step_down("the leader key was deleted or replaced")
        if lease.lost.is_set():
            self._step_down("lease lost")
        elif lease.doubtful.is_set():
            self._step_down("lease not renewed in time (etcd unreachable?)")
        else:
            self._step_down("deposed")

    async def _follow(self, lease: Lease) -> None:
        """Waits until the leader key looks free (or a TTL passes), then returns to campaign."""
        if self.state.leader is None:
            await asyncio.sleep(0.1)  # our view lags behind etcd: don't spin on failed campaigns
        with contextlib.suppress(TimeoutError):
            await _first(
                lease.doubtful.wait(),
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
        """Resigns: revoking the lease deletes the leader key at once, so a standby need not wait
        out the TTL. Awaited here with its own deadline (no task is left behind); a failure is
        logged once with its cause."""
        try:
            await lease.revoke(timeout=REVOKE_TIMEOUT_S)
        except MeshError as exc:
            log.warning("could not revoke leader lease %x (%s); it expires by itself within %ds",
                        lease.id, exc.message, self.ttl_s)

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


async def _stop(task: asyncio.Task[None] | None) -> None:
    """Cancels and awaits a keep-alive task (our own cancellation still propagates)."""
    if task is None:
        return
    task.cancel()
    (result,) = await asyncio.gather(task, return_exceptions=True)
    if isinstance(result, Exception):
        log.error("leader lease keep-alive crashed: %r", result)


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
