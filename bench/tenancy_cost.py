"""What tenancy adds to a router's request path, per request (router/tenancy.py, router/quota.py).

Compares, in one run, the id handling before tenancy (modelid.resolve + a dict lookup) with
what the router does now: the principal's context-variable read, the quota check, the
namespaced lookup and, for a named tenant, the internal id appended to the request and the
public id appended to the response. Minimum of repeated timeit runs, a 1 KiB and a 1 MiB request.

    python bench/tenancy_cost.py
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from tritonclient.grpc import service_pb2 as pb

from mesh.metrics import Metrics
from mesh.settings import RouterSettings
from mesh.types import ModelSpec, TenantSpec
from router import auth, modelid
from router.auth import Principal
from router.quota import Quotas
from router.tenancy import Namespace, caller


class _State:
    """The two dicts of MeshState the request path reads: 2,000 models, one tenant with quotas."""

    def __init__(self) -> None:
        self.models = {f"m{i}": ModelSpec(f"m{i}", "file:///x") for i in range(1000)}
        self.models.update({f"acme:m{i}": ModelSpec(f"acme:m{i}", "file:///x", tenant="acme") for i in range(1000)})
        self.tenants = {"acme": TenantSpec("acme", max_requests_per_s=1e9, max_in_flight=10**6)}


def _request(size: int) -> bytes:
    r = pb.ModelInferRequest(model_name="m5", id="r")
    r.inputs.add(name="input", datatype="FP32", shape=[1, size // 4])
    r.raw_input_contents.append(b"\0" * size)
    return r.SerializeToString()


def _ns(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=25)) / number * 1e9


def _measure(request: bytes, number: int) -> tuple[float, float, float, float]:
    state = _State()
    ns = Namespace(state)  # type: ignore[arg-type]
    quotas = Quotas(state, RouterSettings(), Metrics(service="router"))  # type: ignore[arg-type]
    response = pb.ModelInferResponse(model_name="acme:m5", id="r").SerializeToString()
    default, named = Principal(), Principal(tenant="acme", via="token")
    runs = []
    for _ in range(3):  # interleaved, so a noisy neighbour hits all four alike
        before = _ns(lambda: (modelid.resolve((), request), "m5" in state.models), number)
        own = _ns(lambda: (caller(), quotas.done(quotas.admit(default), 0.0), ns.route(default, (), request),
                           ns.response("m5", "m5", response)), number)
        other = _ns(lambda: (caller(), quotas.done(quotas.admit(named), quotas.clock()),
                             ns.route(named, (), request), ns.response("m5", "acme:m5", response)), number)
        copy = _ns(lambda: request + b"0123456789", number)
        runs.append((before, own, other, copy))
    before, own, other, copy = (min(column) for column in zip(*runs, strict=True))
    return before, own, other, copy


def main() -> None:
    auth.bind(Principal())
    for size in (1024, 1 << 20):
        before, own, other, copy = _measure(_request(size), 5000 if size < 100_000 else 300)
        print(f"{size:>8} B request: before {before / 1000:.2f} us | default tenant {own / 1000:.2f} us "
              f"(+{(own - before) / 1000:.2f}) | named tenant with rate + in-flight quotas {other / 1000:.2f} us "
              f"(+{(other - before) / 1000:.2f}; of which copying the request once: {copy / 1000:.2f} us)")


if __name__ == "__main__":
    main()
