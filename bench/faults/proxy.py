"""A small TCP fault proxy (the toxiproxy idea, loopback only): forwards 127.0.0.1:LISTEN to
127.0.0.1:TARGET, and on a signal blackholes the link.

    python -m bench.faults.proxy --listen 9001 --target 9000

SIGUSR1: blackhole — stop moving bytes both ways and stop opening upstream connections. Nothing
is closed or reset: the peers see what an iptables DROP looks like (TCP flow control stalls,
keepalive pings go unanswered). SIGUSR2: heal — bytes held back flow again (like TCP
retransmission after a partition). SIGTERM: exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time


class Proxy:
    def __init__(self, target: int) -> None:
        self.target = target
        self.open = asyncio.Event()
        self.open.set()
        self.connections = 0

    def mode(self, passing: bool) -> None:
        (self.open.set if passing else self.open.clear)()
        print(f"{time.time():.3f} {'heal' if passing else 'blackhole'}", flush=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self.open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self.pump(reader, up_writer), self.pump(up_reader, writer),
                             return_exceptions=True)

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.open.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self.open.wait()  # bytes read just before a blackhole are held, not sent
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


async def main(listen: int, target: int) -> None:
    proxy = Proxy(target)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, proxy.mode, False)
    loop.add_signal_handler(signal.SIGUSR2, proxy.mode, True)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", listen)
    print(f"proxy 127.0.0.1:{listen} -> 127.0.0.1:{target}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.listen, args.target))
    sys.exit(0)
