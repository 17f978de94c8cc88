"""The Redis key layout of usage telemetry, shared by its writer (router/telemetry.py) and
its reader (placement/telemetry.py), and the client options both use.

Only known keys are touched (RELIABILITY S17: no KEYS, SCAN patterns, EVAL or scripting):

    <ns>:req:<bucket>   hash model id -> requests seen by all routers in that time bucket
                        (bucket = unix seconds // bucket_s), EXPIREd after the retention
    <ns>:last           sorted set model id -> last use, unix ms (ZADD GT: only moves forward)
    <ns>:use:<hour>     hash of the hour's showback (`mesh usage`; hour = unix seconds // 3600):
                        "r|<model id>" -> requests (routers), "m|<model id>" -> memory
                        byte-seconds of its LOADED copies (placement leader), EXPIREd after
                        MESH_USAGE_RETENTION_S
    <ns>:ro:<vmodel>:<second>  hash of one second of a running rollout (mesh/rollout.py):
                        "<model>|n" requests, "|e" errors, "|l<i>" latency bucket i, per
                        target (routers), EXPIREd after mesh/rollout.py RETENTION_S

<ns> is "meshserve:" + the mesh's etcd root, so meshes sharing one Redis never mix.
"""

from __future__ import annotations

import dataclasses

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

LAST_TTL_S = 7 * 24 * 3600  # a model unused for a week is simply 'never used' again
USAGE_RETENTION_S = 35 * 24 * 3600  # showback hours (MESH_USAGE_RETENTION_S)
REQUESTS_FIELD = "r|"  # showback hash fields: requests, memory byte-seconds (+ model id)
MEMORY_FIELD = "m|"


@dataclasses.dataclass(frozen=True)
class TelemetryKeys:
    root: str
    bucket_s: int = 10

    @property
    def ns(self) -> str:
        return f"meshserve:{self.root.strip('/')}"

    def bucket(self, unix_ms: int) -> int:
        return unix_ms // (self.bucket_s * 1000)

    def requests(self, bucket: int) -> str:
        return f"{self.ns}:req:{bucket}"

    def last(self) -> str:
        return f"{self.ns}:last"

    def usage(self, hour: int) -> str:
        """The showback hash of `hour` (unix seconds // 3600)."""
        return f"{self.ns}:use:{hour}"

    def rollout(self, vmodel: str, second: int) -> str:
        """The hash of one second (unix seconds) of a rollout's figures (mesh/rollout.py)."""
        return f"{self.ns}:ro:{vmodel}:{second}"

    def hour_of_bucket(self, bucket: int) -> int:
        return bucket * self.bucket_s // 3600

    def window(self, now_ms: int, window_s: float) -> list[int]:
        """The buckets covering the `window_s` seconds that end at `now_ms` (newest first)."""
        newest = self.bucket(now_ms)
        count = max(1, int(-(-window_s // self.bucket_s)))
        return [newest - i for i in range(count)]


def client(url: str, timeout_s: float) -> aioredis.Redis:
    """A redis.asyncio client with short timeouts and no retries: a sample that cannot be
    written at once is dropped (and counted), never waited for."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), health_check_interval=0,
    )
