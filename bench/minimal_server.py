"""A minimal grpc.aio KServe V2 server running one onnxruntime session (the runtime baseline):
raw FP32 inputs as numpy views, session.run on a 2-thread pool, raw outputs. No validation,
no metrics, no mesh.

    python bench/minimal_server.py LISTEN_PORT MODEL.onnx
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import pathlib
import sys

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from mesh.pb.inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from mesh.pb.inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402


class Minimal(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.pool = concurrent.futures.ThreadPoolExecutor(2)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        feeds = {
            t.name: np.frombuffer(raw, np.float32).reshape(tuple(t.shape))
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        (out,) = await asyncio.get_running_loop().run_in_executor(self.pool, self.session.run, None, feeds)
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="output", datatype="FP32", shape=out.shape)
        response.raw_output_contents.append(out.tobytes())
        return response


async def main(port: int, path: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Minimal(path), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
