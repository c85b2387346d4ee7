"""Benchmark of the link emulator itself (``bench.netproxy``): is it accurate, and what does it cost?

Run: ``.venv/bin/python -m bench.bench_netproxy`` (``--rtt-ms``, ``--rate-mbps``, ``--connections``,
``--mib-per-connection``, ``--requests``, ``--no-docs``).

The proxy runs as its own process (``python -m bench.netproxy``) in front of a small HTTP/1.1 server
(:class:`ByteServer`, in this process) and measures:

* round trips: ``--requests`` sequential requests on one kept-alive connection, expected to take
  one RTT each (plus one RTT for the connection's handshake and one for its first exchange);
* throughput: ``--connections`` parallel downloads of ``--mib-per-connection`` MiB each, expected
  to take ``size / rate`` each (plus two RTT), since the cap is per connection;
* cost: the proxy process's CPU time over the downloads (from /proc) as a share of one core, and its
  peak RSS. With the defaults (4 x 256 MiB at 25 MB/s: 1 GiB at 100 MB/s) it must stay far from
  a full core, or it would be the bottleneck of the benchmarks that use it.

Results replace the section between ``<!-- bench:netproxy -->`` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.netproxy import MB, MiB, ProxyProcess
from bench.report import write_section

BEGIN, END = "<!-- bench:netproxy -->", "<!-- /bench:netproxy -->"
PATTERN = bytes(range(256)) * 4096  # 1 MiB; byte i of every body is i % 256


class ByteServer:
    """An HTTP/1.1 server on loopback with keep-alive: ``GET /bytes/N`` answers N bytes (byte i is
    ``i % 256``), ``HEAD`` the same headers, ``POST`` reads the body and answers its length. It runs on
    threads of this process; sending releases the interpreter lock, so it costs little CPU."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _head(self) -> int:
                size = int(self.path.rsplit("/", 1)[-1])
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                return size

            def do_HEAD(self) -> None:
                self._head()

            def do_GET(self) -> None:
                remaining = self._head()
                view = memoryview(PATTERN)
                while remaining:
                    n = min(remaining, len(view))
                    self.wfile.write(view[:n])
                    remaining -= n

            def do_POST(self) -> None:
                remaining = int(self.headers.get("Content-Length") or 0)
                received = 0
                while remaining:
                    chunk = self.rfile.read(min(remaining, MiB))
                    if not chunk:
                        break
                    received += len(chunk)
                    remaining -= len(chunk)
                body = str(received).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], ConnectionError):  # resets are what cuts do
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ByteServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ByteServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def connect(host: str, timeout: float = 60.0) -> socket.socket:
    name, _, port = host.rpartition(":")
    return socket.create_connection((name, int(port)), timeout=timeout)


def read_response(sock: socket.socket, buffer: bytearray | None = None) -> tuple[bytes, int]:
    """Read one response with a Content-Length body; returns (head, body bytes read). Raises
    ``ConnectionError`` (with ``.received`` set to the body bytes read) if the connection drops."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the end of the headers")
        head += chunk
    head, _, body_start = head.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    received = len(body_start)
    view = memoryview(buffer if buffer is not None else bytearray(MiB))
    try:
        while received < length:
            n = sock.recv_into(view)
            if not n:
                raise ConnectionError("closed before the end of the body")
            received += n
    except OSError as exc:
        exc.received = received  # type: ignore[attr-defined]
        raise
    return head, received


def timed_requests(host: str, count: int, path: str = "/bytes/100") -> tuple[float, float]:
    """(seconds for the first request on a new connection, seconds for the next ``count``)."""
    start = time.perf_counter()
    with connect(host) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        sock.sendall(request)
        read_response(sock)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(count):
            sock.sendall(request)
            read_response(sock)
        return first, time.perf_counter() - start


def timed_download(host: str, size: int, results: list[float], index: int) -> None:
    start = time.perf_counter()
    buffer = bytearray(MiB)
    with connect(host) as sock:
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        _, received = read_response(sock, buffer)
    assert received == size
    results[index] = time.perf_counter() - start


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--rate-mbps", type=float, default=25.0, help="megabytes/s per connection")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--mib-per-connection", type=int, default=256)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    rtt = args.rtt_ms / 1000
    rate = args.rate_mbps * MB
    size = args.mib_per_connection * MiB
    load_before = os.getloadavg()[0]

    with ByteServer() as server, ProxyProcess(server.host, args.rtt_ms, args.rate_mbps) as proxy:
        first, sequential = timed_requests(proxy.host, args.requests)
        print(f"first request {first * 1000:.1f} ms, {args.requests} more {sequential:.3f} s", flush=True)
        results = [0.0] * args.connections
        threads = [
            threading.Thread(target=timed_download, args=(proxy.host, size, results, i))
            for i in range(args.connections)
        ]
        cpu_before = proxy.cpu_seconds()
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        cpu = proxy.cpu_seconds() - cpu_before
        rss = _vm_hwm_mib(proxy.pid)
    if not all(results):
        print("a download failed", file=sys.stderr)
        return 1

    expected_seq = args.requests * rtt
    expected_one = size / rate + 2 * rtt
    total = size * args.connections
    print(f"downloads: {', '.join(f'{r:.2f}' for r in results)} s; wall {wall:.2f} s; proxy CPU {cpu:.2f} s")
    section = f"""### The link itself (`bench/bench_netproxy.py`)

`python -m bench.bench_netproxy` ({time.strftime("%Y-%m-%d")}, {os.cpu_count()} cores, load average \
{load_before:.1f} when it started): the proxy as its own process at {args.rtt_ms:g} ms and \
{args.rate_mbps:g} MB/s per connection, in front of a small HTTP/1.1 server on loopback.

| measurement | expected | measured |
| --- | ---: | ---: |
| first request on a new connection (handshake + exchange) | {2 * rtt * 1000:.0f} ms | {first * 1000:.1f} ms |
| {args.requests} more requests on the same connection | {expected_seq:.2f} s | {sequential:.3f} s \
({sequential / args.requests * 1000:.1f} ms each) |
| one {args.mib_per_connection} MiB download, each of {args.connections} in parallel | \
{expected_one:.2f} s | {min(results):.2f}-{max(results):.2f} s |
| all {args.connections} together ({total / MiB:.0f} MiB) | {expected_one:.2f} s \
({args.connections * rate / MB:.0f} MB/s) | {wall:.2f} s ({total / wall / MB:.0f} MB/s) |
| proxy CPU over the downloads | | {cpu:.2f} s = {cpu / wall * 100:.0f} % of one core |
| proxy peak RSS | | {rss:.0f} MiB |

Each direction holds at most 4 MiB, so the proxy's memory does not grow with the transfer. The event
loop's timers wake up to 1 ms late (epoll counts milliseconds), so an exchange costs the round trip
plus 1-3 ms on a busy machine, never less.
"""
    print(section)
    if not args.no_docs:
        write_section(BEGIN, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
