"""Per-request cost of authentication (router/auth.py Guard), measured in-process.

    python bench/auth_overhead.py [--calls 20000] [--rounds 3]

1. The wrapper alone: a wrapped no-op unary handler called directly with a context carrying
   `authorization: Bearer <token>` (sha256, the token table lookup, expiry, the contextvar),
   minus the same handler unwrapped; 1,000 tokens in the table.
2. End to end: a grpc.aio server on 127.0.0.1 with one no-op bytes method, guarded and not,
   a sequential client sending the token; rounds interleaved. grpc's own per-call cost
   dominates, so this shows whether the wrapper is visible at all.

Both are CPU time of this process (time.process_time), not wall time, so other processes on a
busy machine inflate them less.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc

from mesh import credentials
from mesh.types import TokenRecord
from router import auth

TOKEN = credentials.new_token()


class _Context:
    def __init__(self, metadata: tuple) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def auth_context(self) -> dict:
        return {}


def _guard() -> auth.Guard:
    tokens = {credentials.digest(credentials.new_token()): TokenRecord(tenant=f"t{i}") for i in range(999)}
    tokens[credentials.digest(TOKEN)] = TokenRecord(tenant="bench", name="bench")
    return auth.Guard(auth.Authenticator(tokens))


async def _noop(request: bytes, context: object) -> bytes:
    return request


async def wrapper_alone(calls: int) -> tuple[float, float]:
    handler = grpc.unary_unary_rpc_method_handler(_noop)
    wrapped = _guard().wrap(handler, "/inference.GRPCInferenceService/ModelInfer").unary_unary
    plain = handler.unary_unary
    ctx = _Context((("user-agent", "bench"), *credentials.metadata(TOKEN), ("mm-model-id", "m")))

    async def timed(fn: object) -> float:
        start = time.process_time()
        for _ in range(calls):
            await fn(b"", ctx)  # type: ignore[operator]
        return (time.process_time() - start) / calls * 1e6

    return await timed(plain), await timed(wrapped)


async def end_to_end(calls: int, guarded: bool) -> float:
    server = grpc.aio.server()
    generic = grpc.method_handlers_generic_handler("b.S", {"M": grpc.unary_unary_rpc_method_handler(_noop)})
    server.add_generic_rpc_handlers([_guard().generic(generic) if guarded else generic])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/b.S/M")
            md = credentials.metadata(TOKEN)
            for _ in range(200):
                await call(b"", metadata=md)
            start = time.process_time()
            for _ in range(calls):
                await call(b"", metadata=md)
            return (time.process_time() - start) / calls * 1e6
    finally:
        await server.stop(None)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    deltas = []
    for _ in range(args.rounds):
        plain, wrapped = await wrapper_alone(args.calls * 5)
        deltas.append(wrapped - plain)
    print(f"wrapper alone: +{statistics.median(deltas):.2f} us per call (median of {args.rounds}; "
          f"runs {', '.join(f'{d:.2f}' for d in deltas)})")
    plain_e2e, guarded_e2e = [], []
    for _ in range(args.rounds):
        plain_e2e.append(await end_to_end(args.calls, False))
        guarded_e2e.append(await end_to_end(args.calls, True))
    p, g = statistics.median(plain_e2e), statistics.median(guarded_e2e)
    print(f"end to end (in-process grpc.aio, sequential; client + server CPU): plain {p:.1f} us, guarded {g:.1f} us per call "
          f"({g - p:+.1f} us, {100 * (g - p) / p:+.1f} %)")


if __name__ == "__main__":
    asyncio.run(main())
