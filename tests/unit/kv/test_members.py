"""etcd endpoint parsing and error classification (mesh/kv/members.py): each etcd error
becomes the mesh kind a caller can act on, with a message naming etcd and the cause."""

from __future__ import annotations

import grpc
import pytest

from mesh.errors import Kind, LeaseNotFound
from mesh.kv.etcd import EtcdClient
from mesh.kv.members import classify, parse_endpoint


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize("raw, parsed", [
    ("localhost:2379", "localhost:2379"),
    (" 10.0.0.7:2379 ", "10.0.0.7:2379"),
    ("http://etcd-0.etcd-headless.ns.svc:2379", "etcd-0.etcd-headless.ns.svc:2379"),
    ("https://[::1]:2379/", "[::1]:2379"),
])
def test_endpoints_by_name_or_address(raw: str, parsed: str) -> None:
    assert parse_endpoint(raw) == parsed


@pytest.mark.parametrize("raw", ["localhost", "ipv4:127.0.0.1:2379", "host:0", "host:99999", "a b:1", ""])
def test_malformed_endpoints_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_endpoint(raw)


async def test_client_has_one_member_per_endpoint() -> None:
    """Regression: several endpoints became one `ipv4:` target, which refuses hostnames."""
    client = EtcdClient(["etcd-0.x.svc:2379", "etcd-1.x.svc:2379", "127.0.0.1:2379"])
    try:
        assert client.endpoints == ["etcd-0.x.svc:2379", "etcd-1.x.svc:2379", "127.0.0.1:2379"]
        assert client.member == "etcd-0.x.svc:2379"
    finally:
        await client.close()


@pytest.mark.parametrize("code, details, kind, member_fault, not_applied, words", [
    (grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found", Kind.UNAVAILABLE, False, True,
     "lease not found"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", Kind.RESOURCE_EXHAUSTED,
     False, True, "etcd is out of space"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests", Kind.RESOURCE_EXHAUSTED, True, True,
     "overloaded"),
    (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied", Kind.UNAVAILABLE, False, True,
     "etcd denied"),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: too many operations in txn request", Kind.INVALID_ARGUMENT,
     False, True, "etcd rejected the request"),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader", Kind.UNAVAILABLE, True, True, "etcd member e:1"),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: refused", Kind.UNAVAILABLE,
     True, True, "etcd member e:1"),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out", Kind.UNAVAILABLE, True, False, "timed out"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", Kind.UNAVAILABLE, True, False, "etcd member e:1"),
    (grpc.StatusCode.UNAVAILABLE, "Socket closed", Kind.UNAVAILABLE, True, False, "Socket closed"),
])
def test_errors_are_classified(code, details, kind, member_fault, not_applied, words) -> None:  # type: ignore[no-untyped-def]
    fault = classify(_error(code, details), "e:1")
    assert fault.error.kind == kind
    assert (fault.member_fault, fault.not_applied) == (member_fault, not_applied)
    assert words in fault.error.message and "etcd" in fault.error.message
    assert "etcd unavailable" not in fault.error.message


def test_lease_not_found_is_its_own_type() -> None:
    """Regression: "requested lease not found" was reported as "etcd unavailable"."""
    fault = classify(_error(grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"), "e:1")
    assert isinstance(fault.error, LeaseNotFound)
