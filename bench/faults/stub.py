"""A bad artifact server on loopback (F17, F18): serves the files of one folder, each path
prefix choosing a misbehaviour.

    python -m bench.faults.stub --port P --dir D
    GET /ok/<file>         the file (also /badsha/<file>: register it with a wrong sha256)
    GET /stall/<file>      headers (true Content-Length), then nothing, ever
    GET /truncated/<file>  true Content-Length, half the body, then the connection closes
    GET /status500/<file>  HTTP 500
    GET /drip/<file>       1 byte per second
    GET /huge/<file>       Content-Length: 10 TB, then nothing
    GET /slow/<file>?bps=N N bytes per second (a download slow enough to kill mid-way)
    GET /_stats            JSON: requests per path, bytes sent per path

Every stall is bounded (10 minutes) and ends when the client goes away.
"""

from __future__ import annotations

import argparse
import collections
import http.server
import json
import pathlib
import socket
import threading
import time
import urllib.parse

_LIMIT_S = 600


class Handler(http.server.BaseHTTPRequestHandler):
    folder: pathlib.Path
    counts: collections.Counter = collections.Counter()
    sent: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def log_message(self, fmt: str, *args: object) -> None:
        print(f"{time.time():.3f} " + fmt % args, flush=True)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/_stats":
            with self.lock:
                body = json.dumps({"requests": dict(self.counts), "bytes": dict(self.sent)}).encode()
            return self._reply(200, body)
        _, mode, name = (url.path.split("/", 2) + ["", ""])[:3]
        with self.lock:
            self.counts[url.path] += 1
        path = self.folder / pathlib.Path(name).name
        if not path.is_file():
            return self._reply(404, b"no such file")
        data = path.read_bytes()
        if mode == "status500":
            return self._reply(500, b"internal error")
        if mode in ("ok", "badsha"):  # badsha: the right bytes, registered with another sha256
            return self._reply(200, data)
        self.send_response(200)
        self.send_header("Content-Length", str(10**13 if mode == "huge" else len(data)))
        self.end_headers()
        if mode == "truncated":
            self._write(url.path, data[: len(data) // 2])
            self.close_connection = True
        elif mode in ("stall", "huge"):
            self._hold()
        elif mode in ("drip", "slow"):
            bps = 1 if mode == "drip" else int(urllib.parse.parse_qs(url.query).get("bps", ["65536"])[0])
            self._trickle(url.path, data, max(bps, 1))

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _write(self, key: str, chunk: bytes) -> None:
        self.wfile.write(chunk)
        self.wfile.flush()
        with self.lock:
            self.sent[key] += len(chunk)

    def _hold(self) -> None:
        end = time.monotonic() + _LIMIT_S
        self.connection.settimeout(1.0)
        while time.monotonic() < end:
            try:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":  # the peer closed
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def _trickle(self, key: str, data: bytes, bps: int) -> None:
        step = max(1, bps // 10)  # ten writes a second
        end = time.monotonic() + _LIMIT_S
        try:
            for i in range(0, len(data), step):
                if time.monotonic() > end:
                    return
                self._write(key, data[i : i + step])
                time.sleep(step / bps)
        except OSError:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    Handler.folder = pathlib.Path(args.dir)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"stub on 127.0.0.1:{args.port} serving {args.dir}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
