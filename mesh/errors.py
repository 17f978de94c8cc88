"""One exception hierarchy for the whole mesh, tagged with a transport-neutral kind.

Domain code raises these; mesh/rpc/status.py maps a kind to a gRPC status code once.
Messages are meant for users: say what was wrong and what to do, never leak internal paths.
"""

from __future__ import annotations

import enum
import re


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
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no, unknown, expired or revoked credentials
    PERMISSION_DENIED = "PERMISSION_DENIED"  # known caller, scope too narrow for the operation
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


class Unauthenticated(MeshError):
    kind = Kind.UNAUTHENTICATED


class PermissionDenied(MeshError):
    kind = Kind.PERMISSION_DENIED


MAX_QUOTED = 64  # characters of a client-supplied id an error echoes (then "…")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def quote_id(value: object, limit: int = MAX_QUOTED) -> str:
    """A client-supplied id (model, input, tenant, ...) as an error message may echo it:
    quoted, control characters escaped, at most `limit` characters then "…". Every message
    naming an id the caller sent goes through this, so a 200,000-character id never turns
    into a 200 kB status (which trips the client's metadata limit instead of telling it what
    was wrong) and a newline in an id cannot forge a log or message line."""
    text = value if isinstance(value, str) else str(value)
    cut = text[:limit]
    cut = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", cut)
    return f"'{cut}…'" if len(text) > limit else f"'{cut}'"


# An absolute path on its own (not the path part of a URI: "file:///x" and "http://h/x" keep
# theirs, since the caller wrote them): "/tmp/x/cache/objects/ab" in an onnxruntime or OS error.
_PATH = re.compile(r"(?<![\w:/.~%-])/(?:[^\s'\"`,;:()\[\]{}<>]+)")


def redact_paths(text: str) -> str:
    """`text` with every bare absolute filesystem path replaced by "<path>": what the mesh
    tells a caller (statuses, last_error) never reveals its cache, state or code layout."""
    return _PATH.sub("<path>", text) if "/" in text else text


def model_not_found(model_id: str) -> NotFound:
    return NotFound(f"model {quote_id(model_id)} is not registered; register it with `mesh register`")
