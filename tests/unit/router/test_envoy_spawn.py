"""Envoy's start (router/envoy.py `_with_parent_death`): the process it execs dies with the
router, even when the router is killed with SIGKILL, and keeps its PID through the exec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from router.envoy import _with_parent_death

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# A stand-in for the router: starts `sleep` the way the router starts Envoy, prints its PID,
# then waits to be killed.
_ROUTER = """
import subprocess, sys, time
from router.envoy import _with_parent_death
child = subprocess.Popen(_with_parent_death(["/bin/sleep", "120"]), env={"PATH": "/usr/bin:/bin"})
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")[:-1]


def test_the_child_is_the_binary_itself_and_dies_with_a_killed_router() -> None:
    router = subprocess.Popen([sys.executable, "-c", _ROUTER], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    try:
        assert router.stdout is not None
        pid = int(router.stdout.readline())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _cmdline(pid)[:1] != ["/bin/sleep"]:
            time.sleep(0.02)
        assert _cmdline(pid) == ["/bin/sleep", "120"]  # exec'd in place: the PID the router holds is Envoy's
        router.send_signal(signal.SIGKILL)
        router.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.02)
        assert not _alive(pid), "the child outlived its router"
    finally:
        router.kill()
        router.wait(10)


def test_a_child_whose_router_is_already_gone_does_not_start() -> None:
    # the PID check after prctl: a parent other than the one named exits before the exec
    args = _with_parent_death(["/bin/sleep", "120"])
    args[args.index(str(os.getpid()))] = "1"
    done = subprocess.run(args, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 70
