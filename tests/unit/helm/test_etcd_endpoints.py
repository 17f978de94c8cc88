"""The etcd endpoints the chart renders are ones the etcd client accepts: names, not only
addresses. Regression: the bundled etcd with `etcd.replicas > 1` (and the README's external
example) render hostnames, which the client's old `ipv4:` target refused ("invalid ipv4
address"), and the chart test only compared strings."""

from __future__ import annotations

import asyncio
import pathlib
import re

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from mesh.kv.etcd import EtcdClient
from mesh.settings import CommonSettings

pytest.importorskip("helm_sdkpy", reason="scripts/test.sh installs helm-sdkpy (the Helm library)")
from tests.unit.helm import chart  # noqa: E402
from tests.unit.helm.test_chart import container_of  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def _rendered_endpoints(rendered: chart.Rendered) -> str:
    container = container_of(rendered.named("Deployment", "-router")["spec"]["template"]["spec"], "router")
    (value,) = [e["value"] for e in container["env"] if e["name"] == "MESH_ETCD_ENDPOINTS"]
    return value


def test_three_bundled_members_render_endpoints_the_client_takes() -> None:
    value = _rendered_endpoints(chart.render({"etcd": {"replicas": 3}}))
    endpoints = CommonSettings(etcd_endpoints=value).endpoints()
    assert len(endpoints) == 3
    assert all(re.fullmatch(r"[a-z0-9.-]+-etcd-\d\.[a-z0-9.-]+-etcd-headless\.[a-z0-9.-]*\.?svc:2379", e)
               for e in endpoints), endpoints
    asyncio.run(_accepts(endpoints))


async def _accepts(endpoints: list[str]) -> None:
    client = EtcdClient(endpoints)
    try:
        assert client.endpoints == endpoints
        # One channel per name through grpc's dns resolver, not one `ipv4:` list (which
        # refuses names).
        assert len(client._members.members) == len(endpoints)
    finally:
        await client.close()


async def test_readme_external_etcd_example_is_accepted() -> None:
    (example,) = re.findall(r"etcd\.external\.endpoints=(\[[^]]*\])", README.read_text())
    names = re.findall(r'"([^"]+)"', example)
    await _accepts(CommonSettings(etcd_endpoints=",".join(names)).endpoints())


async def test_a_name_is_resolved_by_grpcs_dns_resolver() -> None:
    """A member given by name connects through grpc's dns resolver (here `localhost`, against
    a gRPC server on 127.0.0.1), which re-resolves the name when a connection fails."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = EtcdClient([f"localhost:{port}", "127.0.0.1:1"])
    try:
        member = client._members.members[0]
        await asyncio.wait_for(member.channel.channel_ready(), 10)
    finally:
        await client.close()
        await server.stop(0)
