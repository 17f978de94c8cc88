"""Copy and model status on the wire: every CopyState (UNLOADING included) has a proto value in
both servers that send copies, and the footprint's measure_method reaches the status
(`mesh status` shows it)."""

from __future__ import annotations

import pytest

from mesh.pb.v1 import types_pb2
from mesh.types import CopyRecord, CopyState, ModelSpec, ModelStats
from placement.server import copy_status
from router.registry import ModelState, ModelStatus
from router.registry_api import status_to_pb


@pytest.mark.parametrize("state", list(CopyState))
def test_every_copy_state_maps_in_both_servers_with_its_measure_method(state: CopyState) -> None:
    copy = CopyRecord("m", "pod-0", "127.0.0.1:1", state, size_bytes=5, measure_method="nvml-host-pid")
    sent = copy_status(copy)
    assert types_pb2.CopyState.Name(sent.state) == state.name
    assert sent.measure_method == "nvml-host-pid"
    stats = ModelStats("m", size_bytes=5, measure_method="rss+peak")
    status = status_to_pb(ModelStatus(ModelSpec("m", "file:///m.onnx"), ModelState.LOADED, (copy,), stats))
    assert types_pb2.CopyState.Name(status.copies[0].state) == state.name
    assert status.copies[0].measure_method == "nvml-host-pid" and status.measure_method == "rss+peak"
