"""One exception hierarchy for the whole mesh, tagged with a transport-neutral kind.

Domain code raises these; mesh/rpc/status.py maps a kind to a gRPC status code once.
Messages are meant for users: say what was wrong and what to do, never leak internal paths.
"""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    NOT_FOUND = "NOT_FOUND"  # unknown model: do not retry
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # bad request: do not retry
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNAVAILABLE = "UNAVAILABLE"  # not processed, safe to retry (elsewhere)
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # e.g. the model's load failed
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # nothing fits / shed
    ABORTED = "ABORTED"  # lost a compare-and-swap
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class MeshError(Exception):
    """Base class; `kind` decides the status a caller sees."""

    kind: Kind = Kind.INTERNAL

    def __init__(self, message: str, *, kind: Kind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.kind.value


class NotFound(MeshError):
    kind = Kind.NOT_FOUND


class InvalidArgument(MeshError):
    kind = Kind.INVALID_ARGUMENT


class AlreadyExists(MeshError):
    kind = Kind.ALREADY_EXISTS


class Unavailable(MeshError):
    kind = Kind.UNAVAILABLE


class LeaseNotFound(Unavailable):
    """etcd no longer has the lease a write or renewal named (it expired or was revoked):
    nothing was written; grant a new lease and write again."""


class LoadFailed(MeshError):
    kind = Kind.FAILED_PRECONDITION


class NoCapacity(MeshError):
    kind = Kind.RESOURCE_EXHAUSTED


class Overloaded(MeshError):
    """Shed: a bounded queue is full. The caller sees RESOURCE_EXHAUSTED with
    `retry_after_ms` as the grpc-retry-pushback-ms trailing metadata (mesh/rpc/status.py)."""

    kind = Kind.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = max(1, int(retry_after_ms))


class Conflict(MeshError):
    """A compare-and-swap lost; the caller may retry after re-reading."""

    kind = Kind.ABORTED


class DeadlineExceeded(MeshError):
    kind = Kind.DEADLINE_EXCEEDED


def model_not_found(model_id: str) -> NotFound:
    return NotFound(f"model '{model_id}' is not registered; register it with `mesh register`")
