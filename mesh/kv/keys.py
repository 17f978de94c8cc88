"""The whole etcd key layout, in one place. Every key lives under a configurable root.

    <root>/models/<model_id>                   ModelSpec        router (registration API)
    <root>/instances/<instance_id>             InstanceRecord   runtime pod, leased
    <root>/assignments/<instance_id>/<model>   Assignment       placement leader, fenced
    <root>/copies/<model_id>/<instance_id>     CopyRecord       runtime pod, leased
    <root>/stats/<model_id>                    ModelStats       runtime pod
    <root>/decisions/<model_id>                Decision         placement leader, fenced
    <root>/leader/placement                    LeaderRecord     placement, leased
    <root>/tokens/<sha256 of token>            TokenRecord      admin (mesh token ...)
    <root>/tenants/<tenant>                    TenantSpec       admin (mesh tenant ...)
    <root>/vmodels/<internal name>             VModelRecord     router (VModels API, mesh alias ...)

Model and instance ids never contain '/', so a key splits unambiguously.
"""

from __future__ import annotations

import dataclasses

MODELS = "models"
INSTANCES = "instances"
ASSIGNMENTS = "assignments"
COPIES = "copies"
STATS = "stats"
LEADER = "leader"
DECISIONS = "decisions"
TOKENS = "tokens"
TENANTS = "tenants"
VMODELS = "vmodels"


@dataclasses.dataclass(frozen=True)
class Keys:
    root: str = "/meshserve"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", "/" + self.root.strip("/"))

    def prefix(self, section: str = "") -> str:
        return f"{self.root}/{section}/" if section else f"{self.root}/"

    def model(self, model_id: str) -> str:
        return f"{self.root}/{MODELS}/{model_id}"

    def instance(self, instance_id: str) -> str:
        return f"{self.root}/{INSTANCES}/{instance_id}"

    def assignment(self, instance_id: str, model_id: str) -> str:
        return f"{self.root}/{ASSIGNMENTS}/{instance_id}/{model_id}"

    def assignments_of(self, instance_id: str) -> str:
        return f"{self.root}/{ASSIGNMENTS}/{instance_id}/"

    def copy(self, model_id: str, instance_id: str) -> str:
        return f"{self.root}/{COPIES}/{model_id}/{instance_id}"

    def copies_of(self, model_id: str) -> str:
        return f"{self.root}/{COPIES}/{model_id}/"

    def stats(self, model_id: str) -> str:
        return f"{self.root}/{STATS}/{model_id}"

    def decision(self, model_id: str) -> str:
        return f"{self.root}/{DECISIONS}/{model_id}"

    def token(self, token_sha256: str) -> str:
        return f"{self.root}/{TOKENS}/{token_sha256}"

    def tenant(self, tenant: str) -> str:
        return f"{self.root}/{TENANTS}/{tenant}"

    def vmodel(self, name: str) -> str:
        return f"{self.root}/{VMODELS}/{name}"

    def leader(self) -> str:
        return f"{self.root}/{LEADER}/placement"

    def parse(self, key: str) -> tuple[str, tuple[str, ...]]:
        """'<root>/copies/m1/pod-a' -> ('copies', ('m1', 'pod-a')); ('', ()) if not ours."""
        if not key.startswith(self.root + "/"):
            return "", ()
        parts = key[len(self.root) + 1 :].split("/")
        return parts[0], tuple(parts[1:])


def prefix_end(prefix: bytes) -> bytes:
    """The etcd range_end that covers every key starting with `prefix`."""
    data = bytearray(prefix)
    for i in range(len(data) - 1, -1, -1):
        if data[i] < 0xFF:
            data[i] += 1
            return bytes(data[: i + 1])
    return b"\0"
