"""onnxruntime runs through OrtValues, for the models with a BF16 input or output.

numpy has no bfloat16, so `session.run` can neither take nor return such tensors: a BF16
input arrives as a uint16 array of bit patterns (puller/datatypes.py) and is handed to
onnxruntime as an OrtValue of ONNX type BFLOAT16 over the same buffer (no copy); a BF16
output is read back as its bytes into a uint16 array again. Only these models come here
(executor.py picks the path once, at load); every other model keeps `session.run` or the
executor's IOBinding path, untouched.

Where outputs live: every output is bound to host memory (`bind_output(name, "cpu")`), so
onnxruntime allocates it there and copies it off the device itself when a CUDA kernel made
it. The pointers read below are therefore host pointers by construction on a GPU pod as on
a CPU one; `_host_bytes` checks the OrtValue's device anyway and refuses any other.

Errors: IOBinding reports every failure as a bare RuntimeError, so a failed bound run is
repeated once through `run_with_ort_values`, whose typed error (onnxruntime's
InvalidArgument, Fail, ...) the executor maps to INVALID_ARGUMENT or a failure, as it does
for `session.run`. The repeat is not the fast path (onnxruntime validates every OrtValue's
ownership there), only the way to a typed error.

String inputs cannot be OrtValues in onnxruntime's Python API, so a model mixing BF16
tensors with BYTES inputs is refused at load (`refusal`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from puller.datatypes import ONNX_BFLOAT16, TensorSpec

log = logging.getLogger(__name__)

_UINT16 = np.dtype("<u2")  # the V2 wire layout of BF16


@dataclasses.dataclass(frozen=True)
class Bf16:
    """A model's BF16 inputs and outputs, by name."""

    inputs: frozenset[str]
    outputs: frozenset[str]

    @classmethod
    def of(cls, inputs: Mapping[str, TensorSpec], outputs: Mapping[str, TensorSpec]) -> Bf16 | None:
        """The model's BF16 tensors; None when it has none (it stays off this path)."""
        found = cls(frozenset(n for n, s in inputs.items() if s.datatype == "BF16"),
                    frozenset(n for n, s in outputs.items() if s.datatype == "BF16"))
        return found if found.inputs or found.outputs else None


def refusal(inputs: Mapping[str, TensorSpec], outputs: Mapping[str, TensorSpec]) -> str | None:
    """Why a model cannot be served through OrtValues (None: it can, or needs not)."""
    if Bf16.of(inputs, outputs) is None:
        return None
    strings = sorted(n for n, s in inputs.items() if s.datatype == "BYTES")
    if not strings:
        return None
    return (f"it mixes BF16 tensors with BYTES input '{strings[0]}', which onnxruntime's Python API "
            f"cannot feed together (bfloat16 only as OrtValues, strings never as OrtValues)")


def _ortvalue(arr: np.ndarray, bf16: bool) -> ort.OrtValue:
    # A view of the decoded request bytes when already contiguous; the OrtValue keeps it alive.
    data = np.ascontiguousarray(arr)
    if bf16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(data, ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(data)


def _host_bytes(value: ort.OrtValue) -> bytes:
    device = value.device_name().lower()
    if device != "cpu":  # never read a device pointer as host memory
        raise RuntimeError(f"a bfloat16 output was left on device {device!r}, not in host memory")
    size = value.tensor_size_in_bytes()
    return ctypes.string_at(value.data_ptr(), size) if size else b""


def _array(value: ort.OrtValue, bf16: bool) -> np.ndarray:
    if not bf16:
        return value.numpy()
    shape = tuple(value.shape())
    return np.frombuffer(_host_bytes(value), dtype=_UINT16).reshape(shape)


def _run_bound(session: ort.InferenceSession, values: Mapping[str, ort.OrtValue],
               outputs: Sequence[str]) -> list[ort.OrtValue]:
    binding = session.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name, "cpu")  # host memory by construction (module docstring)
    session.run_with_iobinding(binding)
    return list(binding.get_outputs())


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], outputs: Sequence[str],
        bf16: Bf16) -> list[np.ndarray]:
    """`outputs` of one run, BF16 ones as uint16 arrays of bit patterns; raises onnxruntime's
    own (typed) errors for the caller to map."""
    values = {name: _ortvalue(arr, name in bf16.inputs) for name, arr in feeds.items()}
    try:
        results = _run_bound(session, values, outputs)
    except RuntimeError as exc:  # IOBinding's bare error: repeated for onnxruntime's typed one
        log.debug("bound bfloat16 run failed (%s); repeating through run_with_ort_values", exc)
        results = session.run_with_ort_values(list(outputs), values)
    return [_array(value, name in bf16.outputs) for name, value in zip(outputs, results, strict=True)]
