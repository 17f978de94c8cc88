"""The etcd members an EtcdClient talks to: one gRPC channel per endpoint, which member a call
goes to, when a call may be retried on another, and what an etcd error means for the mesh.

Why one channel per endpoint rather than one channel over all of them: grpc's `ipv4:a,b,c`
target refuses hostnames ("invalid ipv4 address"), its dns resolver takes a single name, and
pick_first on one channel cannot tell a member that is up but cut off from the quorum (its
TCP connection is fine, its linearizable reads time out or say "no leader") from a healthy
one. So each endpoint gets its own `dns:///host:port` channel — grpc re-resolves that name
whenever a connection fails, so a rescheduled etcd pod with a new address is found again —
and we pick the member from the errors calls get (Go clientv3 does the same with its own
balancer): calls stick to one member until it fails, then move on to the next one that has
not failed recently. Every call carries `hasleader=true`, so a member without a leader
refuses at once ("etcdserver: no leader") and cancels its watches instead of hanging.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
from aetcd.rpc import rpc_pb2_grpc

from mesh.errors import InvalidArgument, LeaseNotFound, MeshError, NoCapacity, Unavailable

if TYPE_CHECKING:
    from mesh.kv.etcd import Tls

log = logging.getLogger(__name__)

T = TypeVar("T")

# Sent with every call: a member that has no leader answers "no leader" instead of timing out
# (and cancels our watch when it loses its leader), so we fail over (clientv3 WithRequireLeader).
METADATA = (("hasleader", "true"),)
# How long a member stays out of the rotation after a fault, unless every member has failed.
QUARANTINE_S = 5.0

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # etcd's --grpc-keepalive-min-time is 5 s: pinging more often earns a too_many_pings
    # GOAWAY. Pings only with calls in flight (etcd counts idle pings as strikes) and without
    # a cap on pings between data frames, so an idle watch stream is still checked.
    ("grpc.keepalive_time_ms", 6_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),  # a restarted etcd is found within ~1 s
    # Re-resolve a name soon after a failed connection (grpc's default waits 30 s).
    ("grpc.dns_min_time_between_resolutions_ms", 2_000),
]

_ENDPOINT = re.compile(r"^(?:(?P<host>[A-Za-z0-9._-]+)|\[(?P<v6>[0-9A-Fa-f:.]+)\]):(?P<port>\d{1,5})$")


def parse_endpoint(raw: str) -> str:
    """`host:port`, `[v6]:port`, optionally with http:// or https:// (as etcdctl takes them)."""
    text = raw.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    match = _ENDPOINT.match(text)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"etcd endpoint {raw!r} is not host:port (MESH_ETCD_ENDPOINTS)")
    return text


@dataclasses.dataclass(eq=False)
class Member:
    endpoint: str
    channel: grpc.aio.Channel
    kv: rpc_pb2_grpc.KVStub
    watch: rpc_pb2_grpc.WatchStub
    lease: rpc_pb2_grpc.LeaseStub
    failed_at: float = -math.inf  # monotonic time of its last fault


def _member(endpoint: str, tls: Tls | None) -> Member:
    target = "dns:///" + endpoint
    if tls is None:
        channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    else:
        creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        channel = grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)
    return Member(endpoint, channel, rpc_pb2_grpc.KVStub(channel), rpc_pb2_grpc.WatchStub(channel),
                  rpc_pb2_grpc.LeaseStub(channel))


@dataclasses.dataclass(frozen=True)
class Fault:
    """What one failed call means: the error to raise, whether the member is at fault (so
    calls move to another), and whether etcd surely did not apply the request."""

    error: MeshError
    member_fault: bool
    not_applied: bool


# Failures that happen before etcd looks at the request: safe to send a write elsewhere.
_NOT_APPLIED = ("failed to connect", "no leader", "not capable", "too many requests",
                "dns resolution failed", "name resolution", "unavailable: empty address list")


def classify(exc: grpc.aio.AioRpcError, endpoint: str) -> Fault:
    code, details = exc.code(), exc.details() or ""
    lower = details.lower()
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in lower:
        return Fault(LeaseNotFound(f"etcd: {details} (the lease expired or was revoked)"), False, True)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "space exceeded" in lower:
            msg = (f"etcd is out of space ({details}): its backend quota is full; compact and "
                   "defragment etcd, then disarm its NOSPACE alarm")
            return Fault(NoCapacity(msg), False, True)
        if "too many requests" in lower:  # this member's apply lags far behind its commits
            return Fault(NoCapacity(f"etcd member {endpoint} is overloaded ({details})"), True, True)
        return Fault(NoCapacity(f"etcd refused the request: {details}"), False, True)
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        msg = (f"etcd denied meshserve's access ({code.name}: {details}); check this process's etcd "
               "user, role and client certificate (MESH_ETCD_CERT_FILE)")
        # UNAVAILABLE, not INTERNAL: the caller can do nothing but retry once an operator
        # fixes the credentials, and clients must never see INTERNAL for a mesh fault.
        return Fault(Unavailable(msg), False, True)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.OUT_OF_RANGE):
        return Fault(InvalidArgument(f"etcd rejected the request: {details}"), False, True)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED):
        not_applied = code == grpc.StatusCode.UNAVAILABLE and any(s in lower for s in _NOT_APPLIED)
        return Fault(Unavailable(f"etcd member {endpoint} unavailable: {code.name}: {details}"),
                     True, not_applied)
    return Fault(MeshError(f"etcd error from {endpoint}: {code.name}: {details}"), False, False)


class Members:
    def __init__(self, endpoints: Sequence[str], tls: Tls | None, member_timeout: float) -> None:
        parsed = [parse_endpoint(e) for e in endpoints]
        if not parsed:
            raise ValueError("at least one etcd endpoint is needed (MESH_ETCD_ENDPOINTS)")
        self.members = [_member(e, tls) for e in parsed]
        self.member_timeout = member_timeout
        self._active = 0

    @property
    def active(self) -> Member:
        return self.members[self._active]

    def pick(self, tried: Sequence[Member] = ()) -> Member | None:
        """The member for the next attempt: the current one unless it failed recently, else the
        next healthy one in turn; with every member failed, the one that failed longest ago."""
        left = [m for m in self.members if m not in tried]
        if not left:
            return None
        now = time.monotonic()
        n = len(self.members)
        for step in range(n):
            member = self.members[(self._active + step) % n]
            if member in left and now - member.failed_at >= QUARANTINE_S:
                return member
        return min(left, key=lambda m: m.failed_at)

    def failed(self, member: Member, fault: Fault) -> None:
        now = time.monotonic()
        news = now - member.failed_at >= QUARANTINE_S  # log a member's fault once, not per call
        member.failed_at = now
        if member is self.active and len(self.members) > 1:
            nxt = self.pick([member])
            if nxt is not None:
                self._active = self.members.index(nxt)
                if news:
                    log.warning("%s; using etcd member %s", fault.error.message, nxt.endpoint)

    def succeeded(self, member: Member) -> None:
        if member is not self.active:
            self._active = self.members.index(member)

    async def call(self, attempt: Callable[[Member, float], Awaitable[T]], timeout: float,
                   retry_safe: bool) -> T:
        """Runs `attempt(member, attempt_timeout)` on one member after another until one
        answers, the deadline passes, or an error says retrying cannot help. Each attempt gets
        `member_timeout` while another member is left (a member that cannot answer within it
        is presumed frozen or cut off from its quorum), the last one the remaining time. A
        write (`retry_safe=False`) moves on only when etcd surely did not apply it; one that
        timed out is indeterminate and fails UNAVAILABLE, and the next call goes elsewhere."""
        deadline = time.monotonic() + timeout
        tried: list[Member] = []
        while True:
            member = self.pick(tried)
            remaining = deadline - time.monotonic()
            assert member is not None
            tried.append(member)
            last = len(tried) == len(self.members)
            budget = remaining if last else min(remaining, self.member_timeout)
            try:
                result = await attempt(member, max(budget, 0.05))
            except grpc.aio.AioRpcError as exc:
                fault = classify(exc, member.endpoint)
                if fault.member_fault:
                    self.failed(member, fault)
                retry = fault.member_fault and (retry_safe or fault.not_applied)
                if not retry or last or deadline - time.monotonic() < 0.05:
                    raise fault.error from exc
                continue
            self.succeeded(member)
            return result

    async def close(self) -> None:
        for member in self.members:
            await member.channel.close()
