"""Which request kind grows the router's RSS: unary / streaming, with and without 30 % of
the calls cancelled by the client 0.2-5 ms in (F23's pattern).

    python bench/cancel_leak.py [SECONDS_PER_KIND]

A LocalMesh (1 pod, 1 placement, 1 router) on 127.0.0.1, 8 concurrent callers, bounded by time;
prints the router's VmRSS before and after each kind and the growth per call.

    python bench/cancel_leak.py --grpc [CALLS]

The cause, in grpcio alone (grpc/grpc#43360): one process, a grpc.aio server holding every call
and a client cancelling each once the server has it, the ordinary way (`call.cancel()`, as
cancelling the task awaiting it does) and in grpc-core only (mesh.rpc.calls.cancel_in_core,
what the router does since); prints the C heap bytes (glibc mallinfo2) retained per call.
"""
import asyncio
import pathlib
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from mesh import demo  # noqa: E402
from mesh.cli.local import LocalMesh  # noqa: E402


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

async def phase(addr, kind, cancel, seconds, req):
    ch = grpc.aio.insecure_channel(addr)
    unary = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    end = time.monotonic() + seconds
    rng = random.Random(1)
    n = 0
    async def one():
        if kind == "unary":
            call = unary(req, timeout=2)
            try:
                await call
            except asyncio.CancelledError:
                call.cancel()
                raise
        else:
            call = stream(timeout=2)
            try:
                await call.write(req)
                await call.done_writing()
                await call.read()
            except asyncio.CancelledError:
                call.cancel()
                raise
    async def worker():
        nonlocal n
        while time.monotonic() < end:
            t = asyncio.ensure_future(one())
            if cancel and rng.random() < 0.3:
                await asyncio.wait({t}, timeout=rng.uniform(0.0002, 0.005))
                t.cancel()
            try:
                await t
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                pass
            n += 1
    await asyncio.gather(*(worker() for _ in range(8)))
    await ch.close()
    return n

def main():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="leak-"))
    path = demo.save(demo.linear_model(1), tmp / "m.onnx")
    mesh = LocalMesh(state_dir=tmp / "mesh", pods=1, placements=1, allow_anonymous=True).start(timeout=90)
    try:
        mesh.register("m", path)
        import numpy as np

        from mesh.pb.inference import grpc_predict_v2_pb2 as pb
        r = pb.ModelInferRequest(model_name="m")
        t = r.inputs.add()
        t.name, t.datatype = "input", "FP32"
        t.shape.extend([1, 4])
        r.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        req = r.SerializeToString()
        pid = mesh.procs["router"].pid
        secs = float(sys.argv[1]) if len(sys.argv) > 1 else 45
        asyncio.run(phase(mesh.router_address, "unary", False, 10, req))  # warm up
        for kind, cancel in (("unary", False), ("unary", True), ("stream", False), ("stream", True)):
            before = rss(pid)
            n = asyncio.run(phase(mesh.router_address, kind, cancel, secs, req))
            after = rss(pid)
            print(f"{kind:6s} cancel={cancel!s:5s} {n:6d} calls  router RSS {before/1024:.1f} -> {after/1024:.1f} MiB "
                  f"({(after-before)/max(n,1)*1024:.0f} B/call)", flush=True)
    finally:
        mesh.stop()


async def grpc_only(calls):
    import contextlib
    import ctypes
    import gc

    from mesh.rpc.calls import cancel_in_core

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                  "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2

    def heap():
        gc.collect()
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    arrived = asyncio.Queue()

    async def hold(request, context):
        arrived.put_nowait(None)
        await asyncio.Event().wait()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "probe.Hold", {"Call": grpc.unary_unary_rpc_method_handler(hold)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    method = channel.unary_unary("/probe.Hold/Call")
    async def one(cancel):
        call = method(b"x" * 64, timeout=30)
        await arrived.get()  # the call is in flight: the server holds it
        cancel(call)
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await call

    for name, cancel in (("call.cancel()", lambda c: c.cancel()), ("cancel_in_core", cancel_in_core)):
        for _ in range(calls // 5):
            await one(cancel)
        before = heap()
        for _ in range(calls):
            await one(cancel)
        await asyncio.sleep(0.2)
        print(f"{name:15s} {calls} calls cancelled in flight: {(heap() - before) / calls:.0f} B of C heap retained per call",
              flush=True)
    await channel.close()
    await server.stop(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--grpc"]:
        asyncio.run(grpc_only(int(sys.argv[2]) if len(sys.argv) > 2 else 5000))
    else:
        main()
