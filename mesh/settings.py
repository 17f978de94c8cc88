"""Settings, one pydantic-settings class per process, read from MESH_* environment variables.

Construct them in main() and pass them explicitly; nothing reads the environment at import
time. Every field's docstring is its documentation (docs/OPERATIONS.md lists them).
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mesh.units import parse_bytes


class CommonSettings(BaseSettings):
    """Shared by every process (prefix MESH_)."""

    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore", use_attribute_docstrings=True)

    etcd_endpoints: str = "127.0.0.1:2379"
    """Comma-separated etcd client endpoints, host:port."""
    root: str = "/meshserve"
    """etcd key prefix under which all of this mesh's state lives."""
    log_level: str = "INFO"
    """Python logging level."""
    lease_ttl_s: int = Field(default=10, ge=2, le=300)
    """TTL of instance and leader leases; a dead process disappears after at most this long."""
    redis_url: str = ""
    """Usage telemetry store, e.g. redis://127.0.0.1:6379/0; empty turns telemetry off
    (placement then uses pod-reported recency)."""

    def endpoints(self) -> list[str]:
        return [e.strip() for e in self.etcd_endpoints.split(",") if e.strip()]


class RouterSettings(BaseSettings):
    """The router (prefix MESH_ROUTER_)."""

    model_config = SettingsConfigDict(env_prefix="MESH_ROUTER_", extra="ignore", use_attribute_docstrings=True)

    listen: str = "127.0.0.1:8033"
    """host:port of the V2 inference + registration gRPC server (ModelMesh's port)."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Prometheus metrics port on the listen host; 0 turns the endpoint off."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest request or response message, bytes."""
    max_concurrent_rpcs: int = Field(default=1000, ge=1)
    """RPCs beyond this are rejected at once with RESOURCE_EXHAUSTED."""
    default_deadline_s: float = Field(default=60.0, gt=0)
    """Deadline applied when the caller set none (includes a cold load)."""
    forward_attempts: int = Field(default=3, ge=1, le=10)
    """Copies tried for one request when a copy answers UNAVAILABLE."""
    allowed_schemes: str = "file,http,https"
    """Comma-separated storage-URI schemes accepted at registration."""
    file_roots: str = ""
    """Comma-separated folders file:// URIs must lie under; empty accepts any absolute path."""

    def schemes(self) -> set[str]:
        return {s.strip().lower() for s in self.allowed_schemes.split(",") if s.strip()}

    def roots(self) -> list[str]:
        return [r.strip() for r in self.file_roots.split(",") if r.strip()]


class PlacementSettings(BaseSettings):
    """The placement service (prefix MESH_PLACEMENT_)."""

    model_config = SettingsConfigDict(env_prefix="MESH_PLACEMENT_", extra="ignore", use_attribute_docstrings=True)

    listen: str = "127.0.0.1:8034"
    """host:port of the internal Placement gRPC server (EnsureLoaded)."""
    advertise: str = ""
    """Address routers use to reach this replica; defaults to `listen`."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Prometheus metrics port; 0 turns the endpoint off."""
    load_timeout_s: float = Field(default=120.0, gt=0)
    """How long one copy may stay LOADING before placement gives up on it."""
    default_model_bytes: int = Field(default=0, ge=0)
    """Predicted footprint of a model never loaded before (0: learn it from the first load)."""
    instance_id: str = ""
    """This replica's id in the leader election; defaults to host-pid."""


class RuntimeSettings(BaseSettings):
    """A runtime pod (prefix MESH_RUNTIME_)."""

    model_config = SettingsConfigDict(env_prefix="MESH_RUNTIME_", extra="ignore", use_attribute_docstrings=True)

    listen: str = "127.0.0.1:8035"
    """host:port of the pod's V2 inference gRPC server."""
    advertise: str = ""
    """Address routers use to reach this pod; defaults to `listen`."""
    instance_id: str = ""
    """Unique pod id (e.g. the pod name); defaults to host-port."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Prometheus metrics port; 0 turns the endpoint off."""
    capacity: int = 2 * 1024**3
    """Model memory this pod offers (e.g. 2GiB). On a GPU pod: device total minus `reserve`."""
    reserve: int = 0
    """GPU memory kept free for onnxruntime workspaces (e.g. 1GiB)."""
    cache_dir: str = "/tmp/meshserve-cache"
    """Local disk cache of pulled artifacts."""
    cache_bytes: int = 10 * 1024**3
    """Disk budget of the artifact cache; least recently used artifacts not in use are evicted."""
    executor_threads: int = Field(default=2, ge=1, le=256)
    """Threads running onnxruntime sessions (and loads) off the event loop."""
    intra_op_threads: int = Field(default=1, ge=0, le=256)
    """onnxruntime intra-op threads per session (0: onnxruntime's default)."""
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest request or response message, bytes."""
    download_timeout_s: float = Field(default=300.0, gt=0)
    """Time limit for pulling one artifact."""
    max_artifact_bytes: int = 4 * 1024**3
    """Artifacts larger than this are refused."""
    use_gpu: str = "auto"
    """auto: CUDA when a GPU is present; never: CPU only; always: fail without a GPU."""

    @field_validator("capacity", "reserve", "cache_bytes", "max_artifact_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_bytes(value if isinstance(value, (int, str)) else str(value))
