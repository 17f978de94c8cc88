"""The fault suite's load generator: a closed loop at a fixed offered rate of KServe V2 gRPC
requests, every answer checked against onnxruntime's golden output.

Runs in its own process (multiprocessing spawn: its CPU is not the harness's, and it is a
fresh interpreter). It speaks the V2 protocol with grpcio: requests are encoded once per model
with meshserve's generated `inference` messages (the same wire format tritonclient sends) and
sent as bytes, so this process never imports tritonclient (the two register the same protobuf
names). Every request has the caller's deadline (default 2 s) and a unique id, in the request's
`id` field and in `x-request-id` metadata. Several router endpoints are used round robin; one
that answered UNAVAILABLE is skipped for a second, and one whose channel is reconnecting
(TRANSIENT_FAILURE) until it is connected again, as grpc's round_robin balancer would.

Pacing: request slots are 1/rate apart; up to `max_inflight` requests are outstanding; a slot
missed because every worker was busy is not made up later (closed loop, no burst), so the
achieved rate falls below the offered one when the mesh is slower than the offer.

Each request's record: start and end (CLOCK_MONOTONIC, shared by every process on the
machine), endpoint, model, kind (unary / stream), and code: OK, WRONG (an answer that differs
from golden), CANCELLED_BY_CLIENT (the 'cancel_fraction' the client abandons on purpose) or
the gRPC status name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from typing import Any

OK, WRONG, CLIENT_CANCEL = "OK", "WRONG", "CANCELLED_BY_CLIENT"
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclasses.dataclass
class ModelLoad:
    """One model the load hits: its input (FP32 [rows, cols]) and golden output (FP32)."""

    model_id: str
    input: bytes
    input_shape: tuple[int, ...]
    golden: bytes
    weight: float = 1.0


@dataclasses.dataclass
class LoadConfig:
    addresses: list[str]
    models: list[ModelLoad]
    rate: float = 150.0
    deadline_s: float = 2.0
    max_inflight: int = 64
    cancel_fraction: float = 0.0
    stream_fraction: float = 0.0
    max_seconds: float = 3600.0
    run_id: str = "run"
    seed: int = 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_request(model: ModelLoad, request_id: str) -> bytes:
    """ModelInferRequest{model_name, id, inputs: [input FP32 shape], raw_input_contents}, encoded
    by hand (byte-identical to the generated message's SerializeToString), so the harness
    process needs no `inference` protobuf module at all (tests run it beside tritonclient)."""
    shape = b"".join(_varint(d) for d in model.input_shape)
    tensor = _field(1, b"input") + _field(2, b"FP32") + _field(3, shape)
    return (_field(1, model.model_id.encode()) + _field(3, request_id.encode()) + _field(5, tensor)
            + _field(7, model.input))


def check_response(model: ModelLoad, data: bytes) -> bool:
    """True when the answer's one output equals golden (to float32 rounding)."""
    import numpy as np

    from mesh.pb.inference import grpc_predict_v2_pb2 as pb

    resp = pb.ModelInferResponse.FromString(data)
    if len(resp.outputs) != 1:
        return False
    if resp.raw_output_contents:
        got = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32)
    else:
        got = np.asarray(resp.outputs[0].contents.fp32_contents, dtype=np.float32)
    want = np.frombuffer(model.golden, dtype=np.float32)
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-5, atol=1e-6))


def stream_answer(data: bytes) -> tuple[str, bytes]:
    """(error_message, infer_response bytes) of one ModelStreamInferResponse."""
    from mesh.pb.inference import grpc_predict_v2_pb2 as pb

    resp = pb.ModelStreamInferResponse.FromString(data)
    return resp.error_message, resp.infer_response.SerializeToString()


class Generator:
    def __init__(self, config: LoadConfig, rate_value: Any, stop_event: Any, limit_value: Any = None) -> None:
        self.config = config
        self.rate_value, self.stop_event, self.limit_value = rate_value, stop_event, limit_value
        self.records: dict[str, list] = {k: [] for k in ("start", "end", "endpoint", "model", "kind", "code")}
        self.rng = random.Random(config.seed)
        self.seq = 0
        self.next_slot = 0.0
        self.rate = 0.0
        self.down_until = [0.0] * len(config.addresses)
        self.rr = 0

    def _slot(self) -> tuple[float, float]:
        rate = max(float(self.rate_value.value), 0.1)
        now = time.monotonic()
        if rate != self.rate:  # a new rate starts now: slots claimed at the old one are void
            self.rate, self.next_slot = rate, now
        slot = max(self.next_slot, now)
        self.next_slot = slot + 1.0 / rate
        return slot, rate

    def _endpoint(self) -> int:
        """Round robin over the endpoints a balancer would pick: not marked down after an
        UNAVAILABLE answer, and whose channel is not in TRANSIENT_FAILURE (grpc's round_robin
        policy skips those too; their reconnect backoff is grpc's own)."""
        import grpc

        n = len(self.config.addresses)
        now = time.monotonic()
        for _ in range(n):
            self.rr = (self.rr + 1) % n
            if n == 1:
                return 0
            state = self.channels[self.rr].get_state(try_to_connect=True)
            if self.down_until[self.rr] <= now and state != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                return self.rr
        return self.rr  # every endpoint looks down: try anyway

    def _model(self) -> int:
        weights = [m.weight for m in self.config.models]
        return self.rng.choices(range(len(weights)), weights)[0]

    async def run(self) -> None:
        import grpc

        opts = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        self.channels = [grpc.aio.insecure_channel(a, options=opts) for a in self.config.addresses]
        self.unary = [c.unary_unary(INFER) for c in self.channels]
        self.stream = [c.stream_stream(STREAM) for c in self.channels]
        end = time.monotonic() + self.config.max_seconds
        self.next_slot = time.monotonic()
        workers = [asyncio.create_task(self._worker(i, end)) for i in range(self.config.max_inflight)]
        await asyncio.gather(*workers)
        for c in self.channels:
            await c.close()

    async def _worker(self, index: int, end: float) -> None:
        while not self.stop_event.is_set():
            if self.limit_value is not None and index >= self.limit_value.value:
                await asyncio.sleep(0.05)  # outside the current in-flight limit: idle
                continue
            slot, rate = self._slot()
            if slot > end:
                return
            delay = slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stop_event.is_set():
                return
            if float(self.rate_value.value) != rate:
                continue  # the rate changed while this worker waited for its slot
            await self._one()

    async def _one(self) -> None:
        import grpc

        self.seq += 1
        rid = f"{self.config.run_id}-{self.seq}"
        ep, mi = self._endpoint(), self._model()
        model = self.config.models[mi]
        kind = "stream" if self.rng.random() < self.config.stream_fraction else "unary"
        cancel_after = None
        if self.rng.random() < self.config.cancel_fraction:
            # Mostly before the answer can come back (p50 is a few ms on loopback): early
            # cancels hit the router, later ones the forwarded call on the pod.
            cancel_after = self.rng.uniform(0.0002, 0.005)
        start = time.monotonic()
        task = asyncio.ensure_future(self._call(ep, model, kind, encode_request(model, rid), rid))
        code = OK
        try:
            if cancel_after is not None:
                done, _ = await asyncio.wait({task}, timeout=cancel_after)
                if not done:
                    task.cancel()
                    code = CLIENT_CANCEL
                    try:
                        await task
                    except (asyncio.CancelledError, grpc.RpcError):
                        pass
            if code != CLIENT_CANCEL:
                code = await task
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.down_until[ep] = time.monotonic() + 1.0
        except asyncio.CancelledError:
            code = "CANCELLED"
        except Exception as exc:  # a harness bug must show up in the row, not kill the worker
            code = f"CLIENT_ERROR:{type(exc).__name__}"
        r = self.records
        r["start"].append(start)
        r["end"].append(time.monotonic())
        r["endpoint"].append(ep)
        r["model"].append(mi)
        r["kind"].append(kind)
        r["code"].append(code)

    async def _call(self, ep: int, model: ModelLoad, kind: str, request: bytes, rid: str) -> str:
        meta = (("x-request-id", rid),)
        timeout = self.config.deadline_s
        if kind == "unary":
            call = self.unary[ep](request, timeout=timeout, metadata=meta)
            try:
                data = await call
            except asyncio.CancelledError:
                call.cancel()  # abandoned calls are cancelled explicitly (grpc #43462)
                raise
            return OK if check_response(model, data) else WRONG
        call = self.stream[ep](timeout=timeout, metadata=meta)
        try:
            await call.write(request)
            await call.done_writing()
            data = await call.read()
        except asyncio.CancelledError:
            call.cancel()
            raise
        import grpc

        if data is grpc.aio.EOF:
            await call  # raises the status the stream ended with
            return "STREAM_EOF"
        error, answer = stream_answer(data)
        if error:
            return "STREAM_ERROR"
        return OK if check_response(model, answer) else WRONG


def main(config: LoadConfig, rate_value: Any, stop_event: Any, out_path: str, ready: Any,
         limit_value: Any = None) -> None:
    """Process entry point: runs until `stop_event` (or max_seconds), then writes the records.
    `rate_value` (requests/s) and `limit_value` (most requests in flight, at most max_inflight)
    are shared values the harness may change while it runs."""
    gen = Generator(config, rate_value, stop_event, limit_value)
    ready.set()
    try:
        asyncio.run(gen.run())
    finally:
        with open(out_path, "w") as f:
            json.dump(gen.records, f)


def burst(addresses: list[str], models: list[ModelLoad], deadline_s: float) -> list[tuple[str, str, float]]:
    """Sends one request per entry of `models`, all at once (round robin over `addresses`);
    returns (model_id, code, seconds) per request, answers checked against golden."""
    import grpc

    async def go() -> list[tuple[str, str, float]]:
        channels = [grpc.aio.insecure_channel(a) for a in addresses]

        async def one(i: int, model: ModelLoad) -> tuple[str, str, float]:
            call = channels[i % len(channels)].unary_unary(INFER)
            start = time.monotonic()
            try:
                data = await call(encode_request(model, f"burst-{i}"), timeout=deadline_s)
                code = OK if check_response(model, data) else WRONG
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            return model.model_id, code, time.monotonic() - start

        try:
            return list(await asyncio.gather(*(one(i, m) for i, m in enumerate(models))))
        finally:
            for c in channels:
                await c.close()

    return asyncio.run(go())


def selfcheck() -> dict[str, bool]:
    """The answer check itself: a response equal to golden passes, one differing in the last
    float bit of rounding passes, a wrong one and a wrongly shaped one fail (the CI smoke runs
    this in a child process)."""
    import numpy as np

    from mesh.pb.inference import grpc_predict_v2_pb2 as pb

    golden = np.array([[0.5, -1.25, 3.0]], dtype=np.float32)
    model = ModelLoad("m", b"", (1, 4), golden.tobytes())

    def answer(values: np.ndarray) -> bytes:
        resp = pb.ModelInferResponse(model_name="m")
        out = resp.outputs.add()
        out.name, out.datatype = "output", "FP32"
        out.shape.extend(values.shape)
        resp.raw_output_contents.append(values.astype(np.float32).tobytes())
        return resp.SerializeToString()

    return {
        "equal": check_response(model, answer(golden)),
        "rounding": check_response(model, answer(np.nextafter(golden, np.float32(10)))),
        "wrong": check_response(model, answer(golden + 0.01)),
        "shape": check_response(model, answer(golden[:, :2])),
    }
