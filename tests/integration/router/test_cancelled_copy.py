"""A copy whose pod answers CANCELLED is retried on another copy (router/forward.py).

Regression test (issue 9, rolling restart): a pod stopping under load answered a few requests
CANCELLED — grpc-core cancels the calls that reach a server as it shuts down before a handler
picked them up (grpc/grpc#41785) — and the router passed that CANCELLED to its client, which does
not retry it: 1-2 client-visible errors in a rolling restart of two pods. The router never
cancels its own forwarded call that way (its own cancellation raises CancelledError), so a
CANCELLED status means the pod went away; ModelInfer is idempotent, so it is retried elsewhere.
The fake pod here answers CANCELLED every time, standing in for that race.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from .conftest import Router
from .test_forwarding import _register, _wait_copies

pytestmark = pytest.mark.integration


async def test_cancelled_copy_is_retried_elsewhere(router: Router, pods) -> None:
    stopping = await pods("pod-stopping", grpc.StatusCode.CANCELLED, "CANCELLED")
    good = await pods("pod-good")
    await _register(router, "m")
    await router.add_copy("m", "pod-stopping", stopping.address)
    await router.add_copy("m", "pod-good", good.address)
    await _wait_copies(router, "m", 2)
    async with asyncio.timeout(10):  # the random tie-break picks the stopping copy first sometimes
        while not stopping.calls:
            resp = await router.infer("m")
            assert resp.id == "pod-good"
    assert router.sample("mesh_forward_retries_total") == len(stopping.calls)
