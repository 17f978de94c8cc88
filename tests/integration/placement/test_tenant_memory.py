"""A tenant's memory cap on a real mesh (etcd, placement, a runtime pod, the router, as
processes): the tenant's own copies make room for its next model, its booked bytes stay under
the cap, and a model that cannot fit under it is refused with RESOURCE_EXHAUSTED naming the cap
(placement/tenancy.py). Without the feature all four models stay resident on the roomy pod."""

from __future__ import annotations

import asyncio
import pathlib
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh import types
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.pb.v1 import types_pb2

from ..conftest import start_mesh


def _set_tenant(etcd_endpoint: str, root: str, spec: types.TenantSpec) -> None:
    async def put() -> None:
        etcd = EtcdClient([etcd_endpoint])
        try:
            await etcd.put(Keys(root).tenant(spec.tenant), types.encode(spec))
        finally:
            await etcd.close()

    asyncio.run(put())


def test_a_tenants_memory_cap_on_a_real_mesh(etcd_endpoint: str, tmp_path: pathlib.Path,
                                             model_files: dict[str, pathlib.Path]) -> None:
    folder = str(model_files["linear-0"].parent)
    # Prior ratio 1: a model not yet measured is booked at about the first one's footprint
    # (the default, 3x, would book each newcomer above the small cap below).
    m = start_mesh(tmp_path, etcd_endpoint, pods=1, capacity="256MiB",
                   env={"MESH_ROUTER_FILE_ROOTS": folder, "MESH_RUNTIME_FILE_ROOTS": folder,
                        "MESH_PLACEMENT_PRIOR_RATIO": "1"})
    client = triton.InferenceServerClient(m.router_address)
    x = np.ones((1, 4), dtype=np.float32)

    def infer(model_id: str) -> None:
        inp = triton.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        client.infer(model_id, [inp], client_timeout=60, headers=dict(m.auth_metadata))

    def loaded(model_id: str) -> list[types_pb2.CopyStatus]:
        return [c for c in m.get_model(model_id).copies if c.state == types_pb2.LOADED]

    try:
        ids = [f"acme:l{i}" for i in range(4)]
        for i, model_id in enumerate(ids):
            m.register(model_id, model_files[f"linear-{i}"])
        infer(ids[0])
        size = loaded(ids[0])[0].size_bytes
        assert size > 0
        # Room for two copies of this size (and a little), not three.
        cap = 2 * size + size // 2
        _set_tenant(etcd_endpoint, m.root, types.TenantSpec("acme", memory_cap_bytes=cap))
        time.sleep(1.0)  # placement's view shows the TenantSpec
        for model_id in ids[1:]:
            infer(model_id)  # each one succeeds: acme's own older copies make room
        for _ in range(100):  # the copies' records reach the router's view a moment later
            resident = {i: loaded(i) for i in ids}
            if sum(len(c) for c in resident.values()) <= 2 and resident[ids[-1]]:
                break
            time.sleep(0.1)
        booked = sum(c.size_bytes for copies in resident.values() for c in copies)
        assert resident[ids[-1]], resident  # the last one requested is served
        assert sum(len(c) for c in resident.values()) <= 2, resident
        assert booked <= cap, (booked, cap)
        reasons = [m.get_model(i).last_decision for i in ids[:-1]]
        assert any("memory cap" in r for r in reasons), reasons

        # A cap smaller than any one model: the next load is refused, naming the cap.
        _set_tenant(etcd_endpoint, m.root, types.TenantSpec("acme", memory_cap_bytes=size // 2))
        time.sleep(1.0)
        absent = next(i for i in ids if not loaded(i))
        with pytest.raises(InferenceServerException) as err:
            infer(absent)
        assert str(err.value.status()) == str(grpc.StatusCode.RESOURCE_EXHAUSTED), err.value
        assert "tenant 'acme' memory cap of" in (err.value.message() or ""), err.value.message()
    finally:
        client.close()
        m.stop()
