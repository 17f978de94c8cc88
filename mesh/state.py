"""The mesh's state as typed records, kept current from a `View` (one decode per change).

Router, placement and runtime pods all read the cluster through this: no etcd read on a
request path. Records that fail to decode are logged and skipped, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mesh import types
from mesh.kv import keys as k
from mesh.kv.etcd import Event
from mesh.kv.view import View
from mesh.types import (
    Assignment,
    CopyRecord,
    CopyState,
    Decision,
    InstanceRecord,
    LeaderRecord,
    ModelSpec,
    ModelStats,
    TenantSpec,
    TokenRecord,
    VModelRecord,
)

log = logging.getLogger(__name__)


class MeshState:
    def __init__(self, view: View, keys: k.Keys) -> None:
        self.view = view
        self.keys = keys
        self.models: dict[str, ModelSpec] = {}
        self.instances: dict[str, InstanceRecord] = {}
        self.assignments: dict[str, dict[str, Assignment]] = {}  # instance -> model -> ...
        self.copies: dict[str, dict[str, CopyRecord]] = {}  # model -> instance -> ...
        self.stats: dict[str, ModelStats] = {}
        self.decisions: dict[str, Decision] = {}
        self.leader: LeaderRecord | None = None
        self.tokens: dict[str, TokenRecord] = {}  # sha256 hex of the token -> record
        self.tenants: dict[str, TenantSpec] = {}  # tenant -> quotas
        self.vmodels: dict[str, VModelRecord] = {}  # internal vmodel name -> record (router/vmodels.py)
        self.revs: dict[str, int] = {}  # mod_revision of each assignment and copy key
        self._hooks: list[Callable[[str, tuple[str, ...]], None]] = []
        view.subscribe(self._on_events)

    def on_change(self, hook: Callable[[str, tuple[str, ...]], None]) -> None:
        """hook(section, ids) after each decoded change, e.g. ('copies', ('m1', 'pod-a'))."""
        self._hooks.append(hook)

    # -- queries ------------------------------------------------------------------------------

    def ready_copies(self, model_id: str) -> list[CopyRecord]:
        """LOADED copies on pods that are alive (their instance record exists)."""
        return [
            c
            for inst, c in self.copies.get(model_id, {}).items()
            if c.state is CopyState.LOADED and inst in self.instances
        ]

    def mod_revision(self, key: str) -> int:
        """The mod_revision of an assignments/ or copies/ key as last seen (0: absent)."""
        return self.revs.get(key, 0)

    def assigned_instances(self, model_id: str) -> list[str]:
        return [inst for inst, models in self.assignments.items() if model_id in models]

    async def wait_for(self, predicate: Callable[[], object], timeout: float | None) -> object:
        return await self.view.wait_for(predicate, timeout)

    # -- decoding -----------------------------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        for ev in events:
            section, ids = self.keys.parse(ev.key)
            if section in (k.ASSIGNMENTS, k.COPIES):
                if ev.value is None:
                    self.revs.pop(ev.key, None)
                else:
                    self.revs[ev.key] = ev.mod_revision
            try:
                self._apply(section, ids, ev.value)
            except (ValueError, TypeError) as exc:
                log.warning("ignoring malformed record at %s: %s", ev.key, exc)
                continue
            for hook in self._hooks:
                hook(section, ids)

    def _apply(self, section: str, ids: tuple[str, ...], value: bytes | None) -> None:
        if section == k.MODELS and len(ids) == 1:
            _set(self.models, ids[0], value, ModelSpec)
        elif section == k.INSTANCES and len(ids) == 1:
            _set(self.instances, ids[0], value, InstanceRecord)
        elif section == k.ASSIGNMENTS and len(ids) == 2:
            _set(self.assignments.setdefault(ids[0], {}), ids[1], value, Assignment)
            if not self.assignments[ids[0]]:
                del self.assignments[ids[0]]
        elif section == k.COPIES and len(ids) == 2:
            _set(self.copies.setdefault(ids[0], {}), ids[1], value, CopyRecord)
            if not self.copies[ids[0]]:
                del self.copies[ids[0]]
        elif section == k.STATS and len(ids) == 1:
            _set(self.stats, ids[0], value, ModelStats)
        elif section == k.DECISIONS and len(ids) == 1:
            _set(self.decisions, ids[0], value, Decision)
        elif section == k.TOKENS and len(ids) == 1:
            _set(self.tokens, ids[0], value, TokenRecord)
        elif section == k.TENANTS and len(ids) == 1:
            _set(self.tenants, ids[0], value, TenantSpec)
        elif section == k.VMODELS and len(ids) == 1:
            _set(self.vmodels, ids[0], value, VModelRecord)
        elif section == k.LEADER:
            self.leader = None if value is None else types.decode(LeaderRecord, value)


def _set(table: dict, key: str, value: bytes | None, cls: type) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = types.decode(cls, value)
