"""Frozen records the processes share through etcd, with their JSON encoding.

Every value stored under the mesh's etcd root is one of these, encoded by `encode` and read
back by `decode` (unknown fields are ignored so older processes read newer records).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class CopyState(enum.StrEnum):
    LOADING = "LOADING"
    LOADED = "LOADED"
    UNLOADING = "UNLOADING"  # leaving: still holds memory, serves nothing new
    FAILED = "FAILED"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model (key: models/<model_id>)."""

    model_id: str
    storage_uri: str
    tenant: str = ""
    format: str = "onnx"
    sha256: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    registered_unix_ms: int = 0
    min_copies: int = 0  # copies placement keeps even when idle (0: load on demand)
    max_copies: int = 0  # 0: placement's default maximum
    max_batch_size: int = 0  # dynamic batching off when 0 or 1
    max_queue_delay_us: int = 0
    artifact_bytes: int = 0  # size of the artifact when known at registration (0: unknown)
    # Name of the credentials pods fetch storage_uri with (never the credentials themselves).
    credentials_ref: str = ""
    idle_unload_s: int = 0  # scale to zero after this long idle (0: PlacementSettings.idle_unload_s)
    version: str = ""  # "" or "1": version 1; others are stored as "<id>@<version>" (router/versions.py)


@dataclasses.dataclass(frozen=True)
class InstanceRecord:
    """A live runtime pod (key: instances/<instance_id>, attached to the pod's lease)."""

    instance_id: str
    address: str
    capacity_bytes: int
    used_bytes: int = 0
    models: tuple[str, ...] = ()
    device: str = "cpu"
    started_unix_ms: int = 0
    # GPU pods: every GPU / MIG slice, {"index", "name", "total_bytes", "capacity_bytes"}.
    devices: tuple[Mapping[str, object], ...] = ()
    draining: bool = False  # SIGTERM'd: place nothing here, make its models ready elsewhere


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Placement's decision that a pod should hold a model (key: assignments/<instance>/<model>).

    Carries the artifact location so the pod needs no registry read to load it.
    """

    model_id: str
    instance_id: str
    storage_uri: str
    sha256: str = ""
    predicted_bytes: int = 0
    assigned_unix_ms: int = 0
    max_batch_size: int = 0  # from the ModelSpec: the pod batches when > 1
    max_queue_delay_us: int = 0
    tenant: str = ""  # the ModelSpec's: whose credentials_ref the pod reads
    credentials_ref: str = ""  # from the ModelSpec (puller/storage/credentials.py)


@dataclasses.dataclass(frozen=True)
class CopyRecord:
    """A pod's report on one copy (key: copies/<model>/<instance>, attached to the pod's lease)."""

    model_id: str
    instance_id: str
    address: str
    state: CopyState
    size_bytes: int = 0
    load_ms: int = 0
    error: str = ""
    updated_unix_ms: int = 0
    measure_method: str = ""  # how size_bytes was measured (puller/footprint.py: "rss+peak", "nvml-pid", ...)
    # LOADING, while the artifact is pulled (puller/modelstate.py, about once a second): bytes
    # written so far of the expected total (both 0 when no pull runs or its size is unknown).
    pulled_bytes: int = 0
    total_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """What pods last measured for a model, kept across unloads (key: stats/<model_id>)."""

    model_id: str
    size_bytes: int = 0
    load_ms: int = 0
    last_error: str = ""
    last_error_unix_ms: int = 0
    # V2 tensor metadata of the last loaded copy: [{"name", "datatype", "shape"}], so routers
    # answer ModelMetadata for a model that is not loaded.
    inputs: tuple[Mapping[str, object], ...] = ()
    outputs: tuple[Mapping[str, object], ...] = ()
    artifact_bytes: int = 0  # size of the pulled artifact (placement's prior: artifact x ratio)
    measure_method: str = ""  # how size_bytes was measured (see CopyRecord)


@dataclasses.dataclass(frozen=True)
class Decision:
    """Placement's last decision about a model and its reason (key: decisions/<model_id>).

    action: placed | evicted | copy_added | copy_dropped | replaced | rejected
    """

    model_id: str
    action: str
    instance_id: str = ""
    reason: str = ""
    unix_ms: int = 0


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    """An API token (key: tokens/<sha256 hex of the token>); the token itself is never stored.

    scope "infer": calls and reads the tenant's models, never registers or unregisters one;
    scope "tenant": the tenant's own models; scope "admin": mesh-wide operations (tenant may
    be empty). Two records of one tenant can be valid at once (rotation without downtime).
    """

    tenant: str
    scope: str = "tenant"
    name: str = ""  # operator's label, for listing and revoking
    created_unix_ms: int = 0
    expires_unix_ms: int = 0  # 0: never


@dataclasses.dataclass(frozen=True)
class TenantSpec:
    """A tenant's quotas (key: tenants/<tenant>); a tenant without one gets the settings' defaults.

    0 means "no limit" for every field.
    """

    tenant: str
    max_models: int = 0  # registered models
    memory_reserved_bytes: int = 0  # resident bytes another tenant's load never evicts below
    memory_cap_bytes: int = 0  # resident bytes the tenant's copies may hold at most
    max_requests_per_s: float = 0.0  # per router
    max_in_flight: int = 0  # per router


@dataclasses.dataclass(frozen=True)
class LeaderRecord:
    """The placement leader (key: leader/placement, attached to the leader's lease)."""

    holder_id: str
    address: str
    since_unix_ms: int = 0


@dataclasses.dataclass(frozen=True)
class VModelRecord:
    """A vmodel (alias) naming concrete models (key: vmodels/<internal name>; router/vmodels.py).

    Routers send a request for the vmodel to one of `active` (internal model id -> weight);
    `pending` is a switch in progress (router/vmodel_store.py): its targets are being made
    ready and become `active` once they are. `rollout` is the last rollout started
    (mesh/rollout.py `Rollout.to_record()`); while it runs it drives `active`."""

    name: str  # the internal name (tenant:name for a named tenant, as model ids)
    tenant: str = ""
    active: Mapping[str, int] = dataclasses.field(default_factory=dict)
    pending: Mapping[str, int] = dataclasses.field(default_factory=dict)
    sticky_header: str = ""  # request metadata whose value's hash picks the target
    tags: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)  # header -> value -> model
    rollout: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    updated_unix_ms: int = 0
    switch_started_unix_ms: int = 0
    switch_note: str = ""  # why the pending switch has not completed yet (empty: none known)


def encode(record: Any) -> bytes:
    def default(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, Mapping):
            return dict(value)
        raise TypeError(f"cannot encode {type(value).__name__}")

    return json.dumps(dataclasses.asdict(record), default=default, sort_keys=True).encode()


def decode(cls: type[T], data: bytes) -> T:
    """Decodes a record; raises ValueError on malformed data."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed {cls.__name__} record: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"malformed {cls.__name__} record: not an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        if name == "state":
            value = CopyState(value)
        elif name in ("models", "inputs", "outputs", "devices") and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"malformed {cls.__name__} record: {exc}") from exc
