"""The datatype table between KServe V2 strings, numpy dtypes and onnxruntime type strings.

Pure: no grpc, no onnxruntime. BYTES maps to numpy object arrays of `bytes` on our side;
onnxruntime's string tensors want `str`, which executor.py converts at the boundary.

BF16 has no numpy dtype: on our side it is a uint16 array of the raw bfloat16 bit patterns
(the V2 wire layout, 2 little-endian bytes per element), told apart from UINT16 only by the
model's TensorSpec. Such arrays concatenate and split like any other (puller/batching.py);
onnxruntime is handed them as OrtValues of ONNX type BFLOAT16 (puller/ortvalues.py).
"""

from __future__ import annotations

import numpy as np

# V2 datatype -> (numpy dtype, typed InferTensorContents field or None when raw only)
V2: dict[str, tuple[np.dtype, str | None]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype(np.uint8), "uint_contents"),
    "UINT16": (np.dtype(np.uint16), "uint_contents"),
    "UINT32": (np.dtype(np.uint32), "uint_contents"),
    "UINT64": (np.dtype(np.uint64), "uint64_contents"),
    "INT8": (np.dtype(np.int8), "int_contents"),
    "INT16": (np.dtype(np.int16), "int_contents"),
    "INT32": (np.dtype(np.int32), "int_contents"),
    "INT64": (np.dtype(np.int64), "int64_contents"),
    "FP16": (np.dtype(np.float16), None),
    "BF16": (np.dtype(np.uint16), None),  # bit patterns; raw only, as Triton (no bf16 contents field)
    "FP32": (np.dtype(np.float32), "fp32_contents"),
    "FP64": (np.dtype(np.float64), "fp64_contents"),
    "BYTES": (np.dtype(object), "bytes_contents"),
}

CONTENT_FIELDS = sorted({field for _, field in V2.values() if field})

ONNX_BFLOAT16 = 16  # onnx TensorProto.BFLOAT16, the element type OrtValues of BF16 are made with

# onnxruntime's NodeArg.type -> V2 datatype
ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def v2_of_numpy(dtype: np.dtype) -> str:
    """V2 datatype of a numpy array onnxruntime returned (str/bytes/object arrays are BYTES;
    uint16 is UINT16: only a model's TensorSpec says an array holds BF16)."""
    if dtype.kind in ("O", "U", "S"):
        return "BYTES"
    for name, (np_dtype, _) in V2.items():
        if np_dtype == dtype and name != "BF16":
            return name
    raise ValueError(f"no V2 datatype for numpy {dtype}")


class TensorSpec:
    """A model input or output as V2 describes it: name, datatype, shape (-1 = dynamic)."""

    __slots__ = ("name", "datatype", "shape")

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def __repr__(self) -> str:
        return f"TensorSpec({self.name!r}, {self.datatype}, {list(self.shape)})"
