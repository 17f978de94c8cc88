"""An etcd lease and the loop that keeps it alive.

Three states, as an owner (a pod's registration, the placement leader) must act on them:
- `alive`: renewed recently enough that etcd surely still has the lease;
- `doubtful`: renewals have failed past that point — etcd may already have let it expire, so
  stop acting as its owner (a leader steps down). Renewals go on: etcd keeps a lease through
  its own restart (and extends it on a leader change), so when etcd answers again the lease is
  usually still there and `alive` returns with nothing lost;
- `lost`: etcd says the lease is gone (expired or revoked). `keep_alive` returns.

The point of doubt is the send time of the last successful renewal + 80 % of its TTL: etcd
started that TTL when the renewal arrived, which was after we sent it, so the lease cannot
expire before then. Renewals run every TTL/3 (clientv3's period) in their own task; while they
fail they are retried every RETRY_S, so a restarted etcd is noticed within about a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from mesh.errors import LeaseNotFound, MeshError

if TYPE_CHECKING:
    from mesh.kv.etcd import EtcdClient

log = logging.getLogger(__name__)

SAFE_FRACTION = 0.8
RETRY_S = 0.5


class Lease:
    """A granted lease. `keep_alive` renews it until cancelled or until etcd says it is gone."""

    def __init__(self, client: EtcdClient, lease_id: int, ttl: int, sent_at: float | None = None) -> None:
        self.client = client
        self.id = lease_id
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.alive = asyncio.Event()
        self.doubtful = asyncio.Event()
        self._doubt_timer: asyncio.TimerHandle | None = None
        self._renewed(time.monotonic() if sent_at is None else sent_at, ttl)

    @property
    def safe_until(self) -> float:
        """time.monotonic() up to which etcd surely still has the lease."""
        return self._safe_until

    def _renewed(self, sent_at: float, ttl: int) -> None:
        self.ttl = ttl
        self._safe_until = sent_at + ttl * SAFE_FRACTION
        if self._doubt_timer is not None:
            self._doubt_timer.cancel()
        self._doubt_timer = None
        delay = self._safe_until - time.monotonic()
        if delay <= 0:
            self._doubt()
            return
        self.doubtful.clear()
        self.alive.set()
        try:
            self._doubt_timer = asyncio.get_running_loop().call_later(delay, self._doubt)
        except RuntimeError:  # built outside a loop (tests): checked on the next renewal
            pass

    def _doubt(self) -> None:
        if not self.doubtful.is_set() and not self.lost.is_set():
            log.warning("lease %x not renewed for %.1fs of its %ds TTL: it may have expired",
                        self.id, self.ttl * SAFE_FRACTION, self.ttl)
        self.alive.clear()
        self.doubtful.set()

    def _gone(self) -> None:
        if self._doubt_timer is not None:
            self._doubt_timer.cancel()
        self.alive.clear()
        self.doubtful.set()
        self.lost.set()

    async def keep_alive(self) -> None:
        """Runs until cancelled; returns (with `lost` set) once etcd says the lease is gone."""
        failures = 0
        while not self.lost.is_set():
            interval = max(self.ttl / 3, 0.2)
            sent = time.monotonic()
            try:
                ttl = await self.client.renew(self.id, timeout=max(interval, 1.0))
            except LeaseNotFound:
                ttl = 0
            except MeshError as exc:
                failures += 1
                if failures == 1:
                    log.warning("lease %x renewal failed: %s; retrying every %.1fs", self.id, exc, RETRY_S)
                await asyncio.sleep(RETRY_S)
                continue
            if ttl <= 0:
                log.warning("lease %x expired: etcd no longer has it", self.id)
                self._gone()
                return
            if failures:
                log.info("lease %x renewed again after %d failed attempts (%.1fs)", self.id, failures,
                         time.monotonic() - (self._safe_until - self.ttl * SAFE_FRACTION))
                failures = 0
            self._renewed(sent, ttl)
            await asyncio.sleep(interval)

    def expired(self) -> None:
        """Marks the lease gone because etcd refused a write naming it ("lease not found")."""
        if not self.lost.is_set():
            log.warning("lease %x expired: etcd refused a write naming it", self.id)
        self._gone()

    async def revoke(self, timeout: float | None = None) -> None:
        """Revokes the lease (its keys go at once); a lease etcd no longer has counts as done."""
        await self.client.revoke(self.id, timeout=timeout)
        self._gone()
