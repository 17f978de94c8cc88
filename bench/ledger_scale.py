"""Placement decisions per second against a ledger already holding N resident copies.

    python bench/ledger_scale.py [--resident 1000 5000 10000] [--decisions 300] [--pods 2]

In-process, seconds not minutes: a MeshState over a synchronous in-memory view (the unit
tests' FakeView: a write is visible at once) holds `--pods` roomy pods and N models LOADED on
them (spread round-robin). Then `--decisions` cold misses for new models go through the REAL
decider (Decider.place: ledger views, prior, planner, the assignment and Decision records)
one at a time; each placed copy is reported LOADED at once, as a pod would. The leader
applies the writes without evaluating the pod fences (etcd does that in the mesh; evaluating
them over a dict here would measure the fake, not placement). Also timed: a reconcile pass after
those decisions (Reconciler.reconcile_once, which the leader runs after every burst of changes;
mean of 5, the first sees the decisions' changes) and a miss
that must evict (pods full). Prints one JSON line per N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aetcd.rpc import rpc_pb2  # noqa: E402

from mesh import types  # noqa: E402
from mesh.clock import FakeClock  # noqa: E402
from mesh.metrics import Metrics  # noqa: E402
from mesh.settings import PlacementSettings  # noqa: E402
from placement.controller import Controller  # noqa: E402
from placement.decider import Place  # noqa: E402
from placement.reconcile import Reconciler  # noqa: E402
from tests.unit.placement.fakes import FakeUsage, World, op_changes  # noqa: E402

SIZE = 300_000  # bytes per copy (about a 0.1 MB model's footprint)


class ApplyLeader:
    """Applies every write to the FakeView at once; fences are etcd's job (not measured)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.is_leader = True

    async def write(self, ops: Sequence[rpc_pb2.RequestOp], extra_compares: Sequence[rpc_pb2.Compare] = ()) -> bool:
        self.world.view.apply(op_changes(ops))
        return True


def _loaded(world: World, model_id: str, instance_id: str, size: int) -> None:
    keys = world.keys
    world.view.apply([
        (keys.assignment(instance_id, model_id),
         types.encode(types.Assignment(model_id, instance_id, "file:///x", predicted_bytes=size))),
        (keys.copy(model_id, instance_id),
         types.encode(types.CopyRecord(model_id, instance_id, f"addr-{instance_id}", types.CopyState.LOADED, size))),
    ])


async def measure(resident: int, decisions: int, pods: int) -> dict[str, object]:
    world = World()
    pod_ids = [f"pod-{p}" for p in range(pods)]
    for p in pod_ids:
        world.pod(p, 1 << 40)
    for n in range(resident + decisions + 1):
        world.put(world.keys.model(f"m{n:06d}"),
                  types.ModelSpec(f"m{n:06d}", "file:///x", artifact_bytes=100_000))
    for n in range(resident):
        model_id = f"m{n:06d}"
        world.put(world.keys.stats(model_id), types.ModelStats(model_id, size_bytes=SIZE))
        _loaded(world, model_id, pod_ids[n % pods], SIZE)
    ctl = Controller(world.state, ApplyLeader(world), PlacementSettings(), Metrics(), FakeUsage(), clock=FakeClock())
    for _ in range(3):  # let the set-up's own wake-ups (one per write) run before timing
        await asyncio.sleep(0)
    rec = Reconciler(ctl)
    try:
        await rec.reconcile_once()  # the start-up pass looks at every assignment once
        start = time.perf_counter()
        for n in range(resident, resident + decisions):
            model_id = f"m{n:06d}"
            placed = await ctl.decider.place(Place(model_id))
            _loaded(world, model_id, placed.instance_id, SIZE)
        placing = time.perf_counter() - start

        start = time.perf_counter()
        passes = 5
        for _ in range(passes):
            await rec.reconcile_once()
        reconcile_ms = (time.perf_counter() - start) / passes * 1000

        # Full pods: the next miss must choose victims (with the pods' usage answers).
        for p in pod_ids:
            inst = world.state.instances[p]
            used = sum(1 for m in world.state.assignments.get(p, {})) * SIZE
            world.put(world.keys.instance(p), types.InstanceRecord(p, inst.address, used))
        model_id = f"m{resident + decisions:06d}"
        start = time.perf_counter()
        placed = await ctl.decider.place(Place(model_id))
        evict_ms = (time.perf_counter() - start) * 1000
        return {"resident": resident, "decisions": decisions, "decisions_per_s": round(decisions / placing, 1),
                "ms_per_decision": round(placing / decisions * 1000, 3),
                "reconcile_pass_ms": round(reconcile_ms, 2), "evicting_miss_ms": round(evict_ms, 2),
                "victims": len(placed.victims)}
    finally:
        await ctl.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resident", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--decisions", type=int, default=300)
    ap.add_argument("--pods", type=int, default=2)
    args = ap.parse_args()
    for n in args.resident:
        print(json.dumps(asyncio.run(measure(n, args.decisions, args.pods))), flush=True)


if __name__ == "__main__":
    main()
