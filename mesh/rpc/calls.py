"""Awaiting grpc.aio client calls so that cancelling the awaiting task does not leak memory.

grpcio (1.69 through at least 1.85) frees a batch's C-side memory (its `grpc_op` array, the
byte buffers of the messages sent and received, the status details and trailing metadata)
only when the coroutine awaiting that batch sees it complete (grpc/grpc#43360). Cancelling an
aio call the ordinary way — `call.cancel()`, or cancelling the task that awaits it, which
cancels grpc's own invocation task through the await — drops the in-flight batch, and all of
that stays allocated: about 0.7 KiB per cancelled unary call, which fragments the heap so glibc
cannot return it either. A router forwards every call it receives, so each call its client
cancels leaked once there (issue 9: router RSS +28 % in the 30-minute soak F23).

`settle(call)` awaits a call behind `asyncio.shield`, so a cancellation of the caller reaches
only the shield: the RPC is then cancelled in grpc-core alone (`cancel_in_core`), its batch
completes with status CANCELLED, and grpc's invocation task frees it as on any other answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc.aio import _call as _aio_call  # the concrete Call class: see cancel_in_core

CANCELLED_DETAILS = "cancelled by the caller"


def cancel_in_core(call: Any) -> bool:
    """Cancels `call` in grpc-core only, leaving grpc's Python task that awaits the batch to
    see it complete (and free it). `call.cancel()` also cancels that task: the leak above.

    Uses grpc.aio's concrete base class `Call._cancel`, which cancels the core call and nothing
    else; should a grpcio release drop it, falls back to the public (leaking) cancel."""
    cancel = getattr(_aio_call.Call, "_cancel", None)
    if cancel is None:  # pragma: no cover - a grpcio without it: correct, but leaks again
        return bool(call.cancel())
    return bool(cancel(call, CANCELLED_DETAILS))


async def settle(call: Any) -> Any:
    """Awaits a unary-response aio call (`await call`), cancelling it in core only when the
    caller is cancelled; raises what `await call` raises."""
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        cancel_in_core(call)
        raise
