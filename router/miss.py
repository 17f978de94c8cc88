"""The miss path: ask the placement leader to load a model, then wait for a ready copy.

Placement answers with the ready copies (the pod's answer to its direct Load, before the
pod's LOADED record reaches etcd and this router's table): their addresses are routable at
once, on a pod the router's view still lists under the same address (never one it saw go).
The route table showing a ready copy first ends the wait as well.

One EnsureLoaded per model however many requests miss at once (single flight); the shared
call is bounded by the router's default deadline, each waiter by its own deadline, so a
caller that gives up early neither cancels the load nor cuts it short for the others. A retry
after its copies failed names the pods to avoid: their copies do not count as ready, here or
in placement, which loads a copy elsewhere. With no reachable placement leader a miss waits
`leader_wait_s` for one, then fails UNAVAILABLE instead of using up the caller's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from mesh.errors import DeadlineExceeded, Kind, MeshError, Unavailable
from mesh.metrics import Metrics
from mesh.pb.v1 import internal_pb2, internal_pb2_grpc, types_pb2
from mesh.rpc.server import ChannelPool
from mesh.singleflight import SingleFlight
from mesh.state import MeshState
from router.registry import unknown_model
from router.table import RouteTable

log = logging.getLogger(__name__)

# Placement's answers that are final for this request and reach the caller as they are.
_PASS_THROUGH = {
    grpc.StatusCode.NOT_FOUND: Kind.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: Kind.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Kind.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT: Kind.INVALID_ARGUMENT,
}
LEADER_POLL_S = 0.5  # longest wait for a new leader before asking (again)
LEADER_CONNECT_S = 1.0  # a leader that failed once must connect within this to be asked again


class MissHandler:
    def __init__(
        self,
        state: MeshState,
        table: RouteTable,
        pool: ChannelPool,
        metrics: Metrics,
        load_timeout_s: float,
        leader_wait_s: float,
        leader_lease_s: float = 0.0,
    ) -> None:
        """`leader_lease_s`: the leader's lease TTL. A leader that is still recorded but does
        not answer (paused, partitioned) loses its record within it and a standby takes over,
        so a miss waits up to that much longer than `leader_wait_s` for the standby."""
        self.state = state
        self.table = table
        self.pool = pool
        self.metrics = metrics
        self.load_timeout_s = load_timeout_s
        self.leader_wait_s = leader_wait_s
        self.leader_lease_s = leader_lease_s
        # Each flight answers with placement's ready copies, as (instance id, address).
        self.flights: SingleFlight[tuple[str, frozenset[str]], list[tuple[str, str]]] = SingleFlight()

    def _ready(self, model_id: str, avoid: frozenset[str]) -> bool:
        return any(c.instance_id not in avoid for c in self.table.ready(model_id))

    async def ensure(self, model_id: str, deadline: float, avoid: frozenset[str] = frozenset()) -> list[str]:
        """Returns once a copy of `model_id` is ready on a pod not in `avoid` (instance ids
        whose copies just failed): the addresses placement answered with, on live pods, or []
        when this router's table shows the copy (route by the table then).

        `deadline` is in event-loop time. Raises NotFound for an unregistered model (without
        asking placement), placement's NOT_FOUND / FAILED_PRECONDITION / RESOURCE_EXHAUSTED as
        they are, Unavailable without a reachable leader for leader_wait_s, DeadlineExceeded
        when the deadline passes first.
        """
        if model_id not in self.state.models:
            raise unknown_model(self.state, model_id)
        if self._ready(model_id, avoid):
            return []
        m = self.metrics
        m.cache_misses.labels(m.service).inc()
        start = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                addresses = await self._load_or_ready(model_id, avoid)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model '{model_id}' was not ready before the deadline; it may still be loading, retry"
            ) from None
        m.miss_served(model_id, time.perf_counter() - start)  # ours and ModelMesh's
        return addresses

    async def _load_or_ready(self, model_id: str, avoid: frozenset[str]) -> list[str]:
        """Asks placement (shared flight) and watches this router's own table at once: the copy
        is routable as soon as either shows it. Placement's error still wins while no copy is
        ready; an answer without a live copy waits for the table."""
        flight = asyncio.ensure_future(self.flights.do((model_id, avoid), lambda: self._load(model_id, avoid)))
        ready = asyncio.ensure_future(self.state.wait_for(lambda: self._ready(model_id, avoid), None))
        try:
            done, _ = await asyncio.wait({flight, ready}, return_when=asyncio.FIRST_COMPLETED)
            if ready not in done:
                live = self._live(model_id, flight.result(), avoid)  # placement's error raised here
                if live:
                    return live
                await ready
            return []
        finally:
            for task in (flight, ready):
                task.cancel()  # the shared load goes on for its other waiters (shielded)
            await asyncio.gather(flight, ready, return_exceptions=True)

    def _live(self, model_id: str, copies: list[tuple[str, str]], avoid: frozenset[str]) -> list[str]:
        """The answered copies' addresses still routable now: on a pod this router's view
        lists at that address, not avoided; none when the table has a copy (it routes)."""
        if self._ready(model_id, avoid):
            return []
        out = []
        for instance_id, address in copies:
            inst = self.state.instances.get(instance_id)
            if instance_id not in avoid and inst is not None and inst.address == address:
                out.append(address)
        return out

    async def _load(self, model_id: str, avoid: frozenset[str]) -> list[tuple[str, str]]:
        """Placement's answer: the ready copies as (instance id, address) ([] when the table
        had a copy first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_timeout_s
        # Our view's revision: placement's view may lag behind ours (a model registered a moment
        # ago, acknowledged once this router saw it) and must not answer NOT_FOUND meanwhile.
        request = internal_pb2.EnsureLoadedRequest(model_id=model_id, exclude_instances=sorted(avoid),
                                                   min_revision=self.state.view.revision)
        leaderless_since: float | None = None  # since when no leader was reachable
        failed: str | None = None  # the leader address whose last call failed
        hangs = False  # it accepts connections but never answers (paused), unlike a dead one
        while True:
            if self._ready(model_id, avoid):
                return []
            leader = self.state.leader
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"placement did not load model '{model_id}' in time; retry")
            # A leader that just failed is asked again only once it connects: a paused one
            # accepts TCP but never answers, and a call to it would wait out the whole budget.
            reachable = leader is not None and leader.address != failed
            if leader is not None and leader.address == failed:
                conn = await self._connect(leader.address)
                hangs = conn == grpc.ChannelConnectivity.CONNECTING
                reachable = conn == grpc.ChannelConnectivity.READY
            if leader is not None and reachable:
                stub = internal_pb2_grpc.PlacementStub(self.pool.get(leader.address))
                try:
                    response = await stub.EnsureLoaded(request, timeout=remaining)
                    return [(c.instance_id, c.address) for c in response.copies
                            if c.state == types_pb2.LOADED and c.address]
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if code in _PASS_THROUGH:
                        raise MeshError(exc.details() or code.name, kind=_PASS_THROUGH[code]) from None
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        leaderless_since = None  # a leader is there, the load is slow
                        continue  # loop re-checks the deadline
                    if code != grpc.StatusCode.UNAVAILABLE:
                        raise Unavailable(f"placement could not load model '{model_id}': "
                                          f"{code.name}: {exc.details()}") from None
                    log.info("placement leader %s unavailable for %s: %s", leader.address, model_id,
                             exc.details())
                    failed = leader.address
            now = loop.time()
            if leaderless_since is None:
                leaderless_since = now
                log.info("no reachable placement leader; waiting up to %.1fs to load %s",
                         self.leader_wait_s, model_id)
            # A recorded leader that accepts connections but does not answer (paused, not dead:
            # a dead one refuses them) loses its record within its lease TTL: wait for that too.
            patience = self.leader_wait_s + (self.leader_lease_s if leader is not None and hangs else 0.0)
            left = leaderless_since + patience - now
            if left <= 0:
                raise Unavailable(
                    f"model '{model_id}' is not loaded and no placement leader was reachable for "
                    f"{patience:g}s (MESH_ROUTER_LEADER_WAIT_S); retry")
            await self._await_leader_change(leader.address if leader else None, min(left, remaining))

    async def _connect(self, address: str) -> grpc.ChannelConnectivity:
        """The channel's state after trying to connect for up to LEADER_CONNECT_S: READY,
        TRANSIENT_FAILURE (refused: nobody listens) or CONNECTING (accepted, no handshake)."""
        channel = self.pool.get(address)
        state = channel.get_state(try_to_connect=True)
        if state == grpc.ChannelConnectivity.READY:
            return state
        try:
            await asyncio.wait_for(channel.channel_ready(), LEADER_CONNECT_S)
        except TimeoutError:
            return channel.get_state()
        return grpc.ChannelConnectivity.READY

    async def _await_leader_change(self, address: str | None, remaining: float) -> None:
        def changed() -> bool:
            leader = self.state.leader
            return leader is not None and leader.address != address

        try:
            await self.state.wait_for(changed, min(LEADER_POLL_S, remaining))
        except TimeoutError:
            pass

    async def close(self) -> None:
        await self.flights.close()
