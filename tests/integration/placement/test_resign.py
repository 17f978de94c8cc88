"""A placement leader stopped with SIGTERM resigns: it revokes its lease on the way out, so the
standby leads at once instead of after the lease TTL (placement/main.py shutdown,
placement/leader.py). Real processes: LocalMesh with two placement replicas, one pod, a router.

The lease TTL is 30 s here, so a leader that left its lease to lapse (no revoke, or a revoke
that failed: "could not revoke leader lease") fails the test (its wait gives up after 20 s);
the measured takeover is printed (`-s`). The shutdown resigns before the server's grace for
EnsureLoaded calls in flight, and every shutdown step is logged when it fails ("shutdown: ...",
asserted absent here).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import time

import pytest

from mesh import types
from mesh.cli.local import LocalMesh
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys

pytestmark = pytest.mark.integration

TTL_S = 30


async def _holder(client: EtcdClient, keys: Keys) -> str:
    kv = await client.get(keys.leader())
    return types.decode(types.LeaderRecord, kv.value).holder_id if kv else ""


def test_sigterm_leader_resigns_and_the_standby_leads_at_once(
    etcd_endpoint: str, mesh_root: str, tmp_path: pathlib.Path
) -> None:
    mesh = LocalMesh(state_dir=tmp_path / "mesh", etcd=etcd_endpoint, root=mesh_root, pods=1,
                     capacity="64MiB", lease_ttl_s=TTL_S, placements=2, allow_anonymous=True).start(timeout=90)
    keys = Keys(mesh_root)

    async def measure() -> tuple[str, str, float, float]:
        client = EtcdClient([etcd_endpoint], timeout=2)
        try:
            leader = await _holder(client, keys)
            assert leader in ("placement", "placement-1")
            standby = ({"placement", "placement-1"} - {leader}).pop()
            proc = mesh.procs[leader]
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            vacated = 0.0
            while (holder := await _holder(client, keys)) != standby:
                if not holder and not vacated:
                    vacated = time.monotonic() - t0
                assert time.monotonic() - t0 < 20, f"the standby did not lead (holder {holder!r})"
                await asyncio.sleep(0.02)
            return leader, standby, vacated, time.monotonic() - t0
        finally:
            await client.close()

    try:
        leader, standby, vacated_s, takeover_s = asyncio.run(measure())
        rc = mesh.procs[leader].wait(30)
        assert rc == 0
        log = mesh.log(leader).read_text(errors="replace")
        assert "could not revoke leader lease" not in log
        assert "shutdown:" not in log, "a shutdown step failed or timed out"
        assert f"{standby} is the placement leader" in mesh.log(standby).read_text(errors="replace")
        print(f"\nplacement: SIGTERM to leader {leader}; leader key gone after {vacated_s:.2f}s, "
              f"{standby} leads {takeover_s:.2f}s after the signal (lease TTL {TTL_S}s)")
    finally:
        mesh.stop()
