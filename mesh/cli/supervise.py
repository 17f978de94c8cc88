"""Keeps a LocalMesh's children running (`mesh up`): a child that exits on its own is started
again with the same ports, environment and data dir, after a capped exponential backoff, and
the rest keep serving. Each exit and restart is logged with the child's name, exit code and
restart count.

A child that crashes again soon after a restart waits longer each time (base, 2x, 4x ... up to
the cap); one that stayed up for `stable_s` starts again from the base delay. Children stopped
on purpose (LocalMesh.kill / stop_process / stop) are gone from LocalMesh.procs and so are
never restarted.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.cli.local import LocalMesh

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Child:
    failures: int = 0  # exits since the child last stayed up for stable_s
    due: float | None = None  # when the pending restart happens
    started: float = 0.0
    seen: subprocess.Popen | None = None  # the process whose exit is being handled


class Supervisor:
    def __init__(self, mesh: LocalMesh, base_s: float = 0.5, max_s: float = 10.0, stable_s: float = 30.0,
                 poll_s: float = 0.2) -> None:
        self.mesh = mesh
        self.base_s, self.max_s, self.stable_s, self.poll_s = base_s, max_s, stable_s, poll_s
        self.restarts: dict[str, int] = {}
        self._children: dict[str, _Child] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-supervisor", daemon=True)

    def start(self) -> None:
        now = time.monotonic()
        for name in list(self.mesh.procs):
            self._children[name] = _Child(started=now)
        self._thread.start()

    def close(self) -> None:
        """Stops supervising; returns after a restart in progress has finished."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def _run(self) -> None:
        while not self._closed.wait(self.poll_s):
            try:
                self.check()
            except Exception:  # the supervisor must outlive any one bad restart
                log.exception("supervisor pass failed")

    def delay(self, failures: int) -> float:
        return min(self.max_s, self.base_s * 2 ** max(failures - 1, 0))

    def check(self) -> None:
        """One pass: note new exits, restart the children whose backoff is over."""
        now = time.monotonic()
        with self.mesh._lock:
            current = dict(self.mesh.procs)
        for name in set(self._children) - set(current):
            del self._children[name]  # stopped on purpose
        for name, proc in current.items():
            child = self._children.setdefault(name, _Child(started=now))
            if proc.poll() is None:
                if child.failures and now - child.started >= self.stable_s:
                    child.failures = 0
                continue
            if child.seen is not proc:
                child.seen = proc
                child.failures += 1
                child.due = now + self.delay(child.failures)
                log.warning("%s (pid %d) exited with code %s; restart %d in %.1f s", name, proc.pid,
                            proc.returncode, self.restarts.get(name, 0) + 1, child.due - now)
            if child.due is not None and now >= child.due and not self._closed.is_set():
                self._restart(name, proc, child)

    def _restart(self, name: str, old: subprocess.Popen, child: _Child) -> None:
        try:
            new = self.mesh.restart(name, old)
        except Exception as exc:
            child.failures += 1
            child.due = time.monotonic() + self.delay(child.failures)
            log.warning("%s failed to start again (%s); next try in %.1f s", name, exc,
                        child.due - time.monotonic())
            return
        if new is None:
            return
        self.restarts[name] = self.restarts.get(name, 0) + 1
        child.due, child.started, child.seen = None, time.monotonic(), None
        log.warning("%s restarted as pid %d (restart %d)", name, new.pid, self.restarts[name])
