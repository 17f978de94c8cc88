"""A 3-member etcd cluster on loopback for fault tests, and the faults: kill -9 a member,
SIGSTOP it (a frozen process: its sockets stay open, nothing answers), or cut it off from its
peers while its client port still works (a partition from the quorum).

The partition needs no root: each member advertises its peer URL through a small TCP proxy
(PeerProxy) in front of its real peer port, so refusing that proxy's traffic leaves the member
deaf to its peers (raft messages to it are lost; it loses its leader after an election
timeout) while clients still reach it — as an iptables DROP of its inbound peer traffic would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import signal
import subprocess
import threading
import time

import grpc
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

from mesh.cli import procs


class PeerProxy:
    """Forwards 127.0.0.1:port -> 127.0.0.1:target on its own thread and event loop (so a busy
    test loop cannot stall the cluster); `cut()` drops every connection and refuses new ones."""

    def __init__(self, target: int) -> None:
        self.port = procs.free_port()
        self.target = target
        self._cut = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"peer-proxy-{self.port}", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut.is_set():
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self._cut.is_set() and (data := await reader.read(65536)):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def cut(self) -> None:
        self._cut.set()
        self._loop.call_soon_threadsafe(lambda: [w.transport.abort() for w in list(self._writers)])

    def heal(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@dataclasses.dataclass
class Cluster:
    base: pathlib.Path
    client_ports: dict[str, int]
    peer_ports: dict[str, int]
    proxies: dict[str, PeerProxy]
    procs: dict[str, subprocess.Popen]

    @property
    def names(self) -> list[str]:
        return list(self.client_ports)

    def endpoints(self, first: str | None = None, host: str = "localhost") -> list[str]:
        """Every member's client endpoint by name (`first` leads the list: clients start there)."""
        order = sorted(self.names, key=lambda n: n != first)
        return [f"{host}:{self.client_ports[n]}" for n in order]

    def start(self, name: str, wait: bool = True) -> None:
        advertised = {n: p.port for n, p in self.proxies.items()}
        self.procs[name] = procs.start_etcd_member(
            name, self.base / name, self.client_ports[name], self.peer_ports[name], advertised,
            self.base / f"{name}.log", wait=wait, advertise_peer_port=self.proxies[name].port)

    def kill(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def pause(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGCONT)

    async def leader(self, exclude: tuple[str, ...] = ()) -> str:
        """The name of the raft leader, as the (live, unexcluded) members report it."""
        deadline = time.monotonic() + 20
        while True:
            ids: dict[int, str] = {}
            leader_id = 0
            for name in self.names:
                if name in exclude or self.procs[name].poll() is not None:
                    continue
                async with grpc.aio.insecure_channel(f"127.0.0.1:{self.client_ports[name]}") as ch:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        st = await rpc_pb2_grpc.MaintenanceStub(ch).Status(rpc_pb2.StatusRequest(), timeout=1)
                        ids[st.header.member_id] = name
                        leader_id = st.leader or leader_id
            if leader_id in ids:
                return ids[leader_id]
            if time.monotonic() > deadline:
                raise AssertionError("the etcd cluster has no leader")
            await asyncio.sleep(0.1)

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            procs.stop(proc, grace=5)
            self.proxies[name].close()


def start_cluster(base: pathlib.Path, names: tuple[str, ...] = ("e1", "e2", "e3")) -> Cluster:
    peer_ports = {n: procs.free_port() for n in names}
    cluster = Cluster(base, {n: procs.free_port() for n in names}, peer_ports,
                      {n: PeerProxy(peer_ports[n]) for n in names}, {})
    try:
        for name in names:
            cluster.start(name, wait=False)
        for name in names:
            procs.wait_or_stop(cluster.procs[name], cluster.client_ports[name], 20)
    except BaseException:
        cluster.stop_all()
        raise
    return cluster
