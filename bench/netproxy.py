"""An internet-like link on loopback: a TCP proxy that adds round-trip time, caps each connection's
throughput and cuts connections on demand.

Registries users pull from are tens of milliseconds away and serve each connection at a capped rate;
on loopback every request is free and every byte instant, so a benchmark there rewards the wrong
things (few connections, no overlap of waiting). This proxy sits between a client and a real server
(the ``docker-registry`` of the benchmarks and tests) and makes the loopback behave like such a link:

* Latency. Each direction delivers what it reads ``rtt / 2`` later, so a request and its response
  cost one round trip. A new connection costs one more, as a TCP handshake does: nothing is
  delivered upstream before ``rtt`` after the client connected.
* Throughput. Each direction of each connection is a link of ``rate`` bytes per second: a byte
  that arrives while the link is busy waits its turn (a token bucket with no burst), then travels
  ``rtt / 2``. So an N-byte response takes ``N / rate + rtt / 2`` after its first byte left the
  server, whatever the chunking. Caps are per connection, not shared: four connections get four
  times the throughput, as with the per-connection caps of CDNs and registries.
* Window. Each direction holds at most ``buffer`` bytes (default 4 MiB) before it stops reading,
  so the sender is held back as by a TCP window; the link is full as long as ``buffer`` exceeds the
  bandwidth-delay product (25 MB/s x 20 ms = 0.5 MB). No slow start, no loss, no reordering.
* Cuts (:meth:`NetProxy.cut`). After N bytes delivered to the client, on the selected
  connection(s), both sides are reset (``SO_LINGER`` 0: an RST, as a dropped link or a killed
  middlebox gives). N counts either everything sent to the client on that connection, or, with
  ``request=``, the body of the response to the first request whose bytes contain that pattern
  (clients that do not pipeline, as ``requests`` and Go's HTTP client, are assumed). The client
  receives exactly N bytes, then the reset.
* Counters (:attr:`NetProxy.connections`): bytes each way per connection, whether it was cut.

Use it from Python (``with NetProxy("127.0.0.1:5000", rtt_ms=40, rate_mbps=25) as proxy:`` then
talk to ``proxy.host``; it runs on its own thread), or as a process, which keeps its CPU and its
interpreter lock away from the process being measured::

    python -m bench.netproxy --upstream 127.0.0.1:5000 --rtt-ms 40 --rate-mbps 25

Rates are in megabytes (10^6 bytes) per second, not megabits. The event loop does no work per byte:
data moves in slices of 64 KiB, so 4 connections at 25 MB/s cost a small part of one core (see
``bench.bench_netproxy``, which measures it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

MB = 1_000_000
MiB = 1024 * 1024
SLICE = 64 * 1024
DEFAULT_BUFFER = 4 * MiB
CUT_FLUSH_DEADLINE = 5.0  # seconds a cut waits for the client to take its last bytes before the RST
SIOCOUTQ = 0x5411  # Linux TIOCOUTQ: bytes in a socket's send queue the peer has not acknowledged


@dataclass
class Cut:
    """A rule: reset a connection once ``after`` bytes have reached the client.

    ``request``: count only the body of the response to the first request containing these bytes
    (for instance a blob digest), instead of everything sent on the connection. ``connection``:
    only the connection with this number (1 for the first accepted), else any. ``times``: how many
    connections the rule may still be armed on (``None``: no limit); a rule is spent when it arms,
    so ``times=1`` cuts once and lets the client's retry through.
    """

    after: int
    request: bytes | None = None
    connection: int | None = None
    times: int | None = 1
    fired: int = 0  # connections actually cut by this rule


@dataclass
class ConnectionStats:
    """What one client connection carried. Written by the proxy's loop, read by anyone."""

    number: int
    opened: float  # time.monotonic()
    bytes_up: int = 0  # delivered to the server
    bytes_down: int = 0  # delivered to the client
    cut: bool = False
    closed: float | None = None
    error: str | None = None


class _Pipe:
    """One direction of one connection: bytes read from one side, delivered to the other after the
    link's serialisation time and half the round trip."""

    def __init__(
        self,
        conn: _Connection,
        rate: float | None,
        delay: float,
        limit: int,
        opens_at: float,
        downstream: bool,
    ) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.rate = rate
        self.delay = delay
        self.limit = limit
        self.downstream = downstream
        self.queue: collections.deque[tuple[float, memoryview | None]] = collections.deque()
        self.free_at = opens_at  # when the emulated link has sent everything it was given
        self.queued = 0
        self.received = 0  # stream offset: bytes read from the source so far
        self.delivered = 0  # stream offset: bytes written to the sink so far
        self.source: asyncio.Transport | None = None
        self.sink: asyncio.Transport | None = None
        self.source_paused = False
        self.sink_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.eof_delivered = False
        self.cut_at: int | None = None  # stream offset at which the connection is reset

    def feed(self, data: bytes) -> None:
        now = self.loop.time()
        start = max(now, self.free_at)
        view = memoryview(data)
        for offset in range(0, len(view), SLICE):
            piece = view[offset : offset + SLICE]
            if self.rate:
                start += len(piece) / self.rate
            self.queue.append((start + self.delay, piece))
        self.free_at = start
        self.queued += len(data)
        self.received += len(data)
        if self.queued >= self.limit and self.source is not None and not self.source_paused:
            self.source_paused = True
            self.source.pause_reading()
        self.schedule()

    def feed_eof(self) -> None:
        self.free_at = max(self.loop.time(), self.free_at)
        self.queue.append((self.free_at + self.delay, None))
        self.schedule()

    def schedule(self) -> None:
        if self.timer is None and self.queue and self.sink is not None and not self.sink_paused:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        """Write everything whose delivery time has come, in one write."""
        self.timer = None
        if self.sink is None or self.sink_paused or self.conn.closing:
            return
        now = self.loop.time() + 1e-6
        due: list[memoryview] = []
        eof = cut = False
        while self.queue and self.queue[0][0] <= now:
            _, piece = self.queue.popleft()
            if piece is None:
                eof = True
                break
            if self.cut_at is not None and self.delivered + len(piece) >= self.cut_at:
                piece = piece[: self.cut_at - self.delivered]
                cut = True
            due.append(piece)
            self.delivered += len(piece)
            if cut:
                break
        if due:
            data = b"".join(due)
            self.queued -= len(data)
            self.sink.write(data)
            if self.downstream:
                self.conn.stats.bytes_down += len(data)
            else:
                self.conn.stats.bytes_up += len(data)
        if cut:
            self.conn.cut()
            return
        if self.source_paused and self.queued < self.limit // 2 and self.source is not None:
            self.source_paused = False
            self.source.resume_reading()
        if eof:
            self.eof_delivered = True
            if self.sink.can_write_eof():
                # The other side may have gone already (a TLS server closing its end first).
                with contextlib.suppress(OSError):
                    self.sink.write_eof()
            self.conn.maybe_close()
            return
        self.schedule()

    def pause_sink(self) -> None:
        self.sink_paused = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def resume_sink(self) -> None:
        self.sink_paused = False
        self.schedule()


class _Side(asyncio.Protocol):
    """The protocol of one socket of a connection; it forwards events to the connection."""

    def __init__(self, conn: _Connection, client: bool) -> None:
        self.conn = conn
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.client:
            self.conn.client_connected(transport)
        else:
            self.conn.upstream_connected(transport)

    def data_received(self, data: bytes) -> None:
        if self.client:
            self.conn.from_client(data)
        else:
            self.conn.from_upstream(data)

    def eof_received(self) -> bool:
        (self.conn.up if self.client else self.conn.down).feed_eof()
        return True  # keep our sending half open: TCP half-close, as the peer meant it

    def pause_writing(self) -> None:
        (self.conn.down if self.client else self.conn.up).pause_sink()

    def resume_writing(self) -> None:
        (self.conn.down if self.client else self.conn.up).resume_sink()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(exc, client=self.client)


class _Connection:
    """One client connection and its upstream connection, with a pipe each way."""

    def __init__(self, proxy: _Proxy, number: int) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        link = proxy.link
        now = self.loop.time()
        self.stats = ConnectionStats(number=number, opened=time.monotonic())
        handshake_done = now + link.rtt  # the SYN / SYN-ACK round trip a real connect waits for
        self.up = _Pipe(self, link.up_rate, link.rtt / 2, link.buffer, handshake_done, downstream=False)
        self.down = _Pipe(self, link.rate, link.rtt / 2, link.buffer, handshake_done, downstream=True)
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.closing = False
        self.request_tail = b""  # the end of the previous chunk, for a pattern split across two
        self.body_cut: int | None = None  # armed response cut, waiting for the end of the headers
        self.header_tail = b""
        self.rule: Cut | None = None  # the cut armed on this connection

    # -- events -------------------------------------------------------------------------------

    def client_connected(self, transport: asyncio.Transport) -> None:
        self.client = transport
        self.up.source = transport
        self.down.sink = transport
        rule = self.proxy.take_rule(self.stats.number, None)
        if rule is not None:
            self.down.cut_at = rule.after
            self.rule = rule
        self.proxy.tasks.add(task := self.loop.create_task(self.connect_upstream()))
        task.add_done_callback(self.proxy.tasks.discard)

    async def connect_upstream(self) -> None:
        host, port = self.proxy.upstream
        try:
            await self.loop.create_connection(lambda: _Side(self, client=False), host, port)
        except OSError as exc:
            self.stats.error = f"upstream: {exc}"
            self.loop.call_at(self.up.free_at, self.reset)

    def upstream_connected(self, transport: asyncio.Transport) -> None:
        if self.closing:
            transport.abort()
            return
        self.upstream = transport
        self.up.sink = transport
        self.down.source = transport
        if self.down.source_paused:
            transport.pause_reading()
        self.up.schedule()

    def from_client(self, data: bytes) -> None:
        armed = self.rule is not None
        if not armed and self.proxy.request_rules:
            window = self.request_tail + data
            rule = self.proxy.take_rule(self.stats.number, window)
            if rule is not None:
                # The client does not pipeline: every earlier response has been read from the
                # server, so the next byte from the server starts this request's response.
                self.rule = rule
                self.body_cut = rule.after
            self.request_tail = window[-self.proxy.longest_request :]
        self.up.feed(data)

    def from_upstream(self, data: bytes) -> None:
        if self.body_cut is not None:
            window = self.header_tail + data
            end = window.find(b"\r\n\r\n")
            if end >= 0:
                start = self.down.received - len(self.header_tail)  # stream offset of window[0]
                self.down.cut_at = start + end + 4 + self.body_cut
                self.body_cut = None
            else:
                self.header_tail = window[-3:]
        self.down.feed(data)

    def lost(self, exc: Exception | None, client: bool) -> None:
        if exc is not None and self.stats.error is None:
            self.stats.error = f"{'client' if client else 'upstream'}: {exc!r}"
        if not self.closing:
            # A reset (or an unexpected close) on one side is passed on to the other at once.
            self.reset()

    def maybe_close(self) -> None:
        if self.up.eof_delivered and self.down.eof_delivered:
            self.close()

    # -- endings ------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        for transport in (self.client, self.upstream):
            if transport is not None:
                transport.close()
        self.finished()

    def reset(self) -> None:
        """Both sides closed with an RST, at once (whatever is still queued is dropped)."""
        if not self.closing:
            self.closing = True
            self._reset()

    def _reset(self) -> None:
        for pipe in (self.up, self.down):
            if pipe.timer is not None:
                pipe.timer.cancel()
                pipe.timer = None
        for transport in (self.client, self.upstream):
            if transport is not None:
                _abort_with_rst(transport)
        self.finished()

    def cut(self) -> None:
        """The cut point was written: let the client take those bytes, then reset both sides."""
        self.stats.cut = True
        if self.rule is not None:
            self.rule.fired += 1
        for transport in (self.client, self.upstream):
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.pause_reading()
        self.closing = True
        deadline = self.loop.time() + CUT_FLUSH_DEADLINE

        def reset_when_sent() -> None:
            assert self.client is not None
            if self.loop.time() < deadline and _unsent(self.client) > 0:
                self.loop.call_later(0.001, reset_when_sent)
                return
            self._reset()

        reset_when_sent()

    def shutdown(self) -> None:
        """The proxy stops: reset the connection whatever it was doing (even waiting to cut)."""
        self.closing = True
        self._reset()

    def finished(self) -> None:
        if self.stats.closed is None:
            self.stats.closed = time.monotonic()
        self.proxy.live.discard(self)


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to the client that it has not received yet (ours and the kernel's buffers)."""
    if transport.is_closing():
        return 0
    pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
    return pending


def _abort_with_rst(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass
class _Link:
    rtt: float
    rate: float | None
    up_rate: float | None
    buffer: int


@dataclass
class _Proxy:
    """The proxy's state on its event loop."""

    loop: asyncio.AbstractEventLoop
    upstream: tuple[str, int]
    link: _Link
    rules: list[Cut]
    lock: threading.Lock
    stats: list[ConnectionStats]
    live: set[_Connection] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def request_rules(self) -> bool:
        return any(rule.request for rule in self.rules)

    @property
    def longest_request(self) -> int:
        return max((len(rule.request) for rule in self.rules if rule.request), default=1)

    def accept(self) -> _Side:
        with self.lock:
            number = len(self.stats) + 1
            conn = _Connection(self, number)
            self.stats.append(conn.stats)
        self.live.add(conn)
        return _Side(conn, client=True)

    def take_rule(self, number: int, request: bytes | None) -> Cut | None:
        """The first live rule for this connection (and this request's bytes, if given); spent."""
        with self.lock:
            for rule in self.rules:
                if rule.times == 0 or rule.connection not in (None, number):
                    continue
                if (rule.request is None) != (request is None):
                    continue
                if rule.request is not None and request is not None and rule.request not in request:
                    continue
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return None


class NetProxy:
    """The proxy on a thread of this process; a context manager. See the module's docstring."""

    def __init__(
        self,
        upstream: str,
        rtt_ms: float = 0.0,
        rate_mbps: float | None = None,
        up_rate_mbps: float | None = None,
        buffer_bytes: int = DEFAULT_BUFFER,
        bind: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """``upstream``: host:port. ``rate_mbps``: megabytes per second per connection toward the
        client (None: uncapped); ``up_rate_mbps``: toward the server (None: as ``rate_mbps``; 0:
        uncapped)."""
        host, _, upstream_port = upstream.rpartition(":")
        self.upstream = (host, int(upstream_port))
        up = rate_mbps if up_rate_mbps is None else up_rate_mbps
        self.link = _Link(
            rtt=rtt_ms / 1000,
            rate=rate_mbps * MB if rate_mbps else None,
            up_rate=up * MB if up else None,
            buffer=buffer_bytes,
        )
        self.bind = bind
        self.port = port
        self._rules: list[Cut] = []
        self._stats: list[ConnectionStats] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        """``host:port`` to connect to instead of the upstream."""
        return f"{self.bind}:{self.port}"

    @property
    def connections(self) -> list[ConnectionStats]:
        with self._lock:
            return list(self._stats)

    @property
    def bytes_down(self) -> int:
        return sum(stats.bytes_down for stats in self.connections)

    def cut(
        self,
        after: int,
        request: bytes | str | None = None,
        connection: int | None = None,
        times: int | None = 1,
    ) -> Cut:
        """Add a :class:`Cut` rule (applies to connections and requests from now on)."""
        rule = Cut(
            after=after,
            request=request.encode() if isinstance(request, str) else request,
            connection=connection,
            times=times,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    async def serve(self, started: threading.Event | None = None) -> None:
        """Run until :meth:`stop` (or cancellation); ``port`` is set once listening."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = loop.create_future()
        state = _Proxy(loop, self.upstream, self.link, self._rules, self._lock, self._stats)
        server = await loop.create_server(state.accept, self.bind, self.port, backlog=256)
        self.port = server.sockets[0].getsockname()[1]
        (started or self._ready).set()
        try:
            await self._stop
        finally:
            server.close()
            for conn in list(state.live):
                conn.shutdown()
            await server.wait_closed()

    def _run(self) -> None:
        try:
            asyncio.run(self.serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def start(self) -> NetProxy:
        self._thread = threading.Thread(target=self._run, name="netproxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self.port:
            raise RuntimeError(f"the proxy did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():

            def finish() -> None:
                if not stop.done():
                    stop.set_result(None)

            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(finish)
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> NetProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ProxyProcess:
    """``python -m bench.netproxy`` as a child process (a context manager): the proxy's CPU and
    interpreter lock stay out of the process being measured, and ``pid`` lets it be measured."""

    def __init__(self, upstream: str, rtt_ms: float, rate_mbps: float | None = None) -> None:
        self.command = [
            sys.executable,
            "-m",
            "bench.netproxy",
            "--upstream",
            upstream,
            "--rtt-ms",
            str(rtt_ms),
        ]
        if rate_mbps:
            self.command += ["--rate-mbps", str(rate_mbps)]
        self.process: subprocess.Popen[str] | None = None
        self.host = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stats(self) -> dict[str, int]:
        """Totals so far: connections, bytes_down, bytes_up, cut (the process prints them on SIGUSR1)."""
        assert self.process is not None and self.process.stdout is not None
        self.process.send_signal(signal.SIGUSR1)
        return dict(json.loads(self.process.stdout.readline()))

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the proxy process has used, from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(self) -> ProxyProcess:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.process = subprocess.Popen(self.command, cwd=root, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # "listening on HOST:PORT", or EOF if it failed
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the proxy did not start: {line!r}")
        self.host = line.split()[-1]
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def parse_link(text: str) -> tuple[float, float | None]:
    """``RTT_MS[:RATE_MBPS]`` (as in ``--via-proxy 40:25``) -> (rtt_ms, rate_mbps or None)."""
    rtt, _, rate = text.partition(":")
    return float(rtt), float(rate) if rate else None


@contextlib.contextmanager
def optional_link(upstream: str, link: str | None) -> Iterator[ProxyProcess | None]:
    """A :class:`ProxyProcess` in front of ``upstream`` when ``link`` (``RTT_MS[:RATE_MBPS]``) is given."""
    if not link:
        yield None
        return
    rtt_ms, rate_mbps = parse_link(link)
    with ProxyProcess(upstream, rtt_ms, rate_mbps) as proxy:
        yield proxy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Rates are megabytes (10^6 bytes) per second per connection.",
    )
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time added (default 0)")
    parser.add_argument("--rate-mbps", type=float, help="cap toward the client, per connection")
    parser.add_argument(
        "--up-rate-mbps",
        type=float,
        help="cap toward the server, per connection (default: --rate-mbps; 0: none)",
    )
    parser.add_argument("--buffer-kib", type=int, default=DEFAULT_BUFFER // 1024, help="held per direction")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default: a free port (printed)")
    parser.add_argument(
        "--cut-after", type=int, help="reset a connection after this many bytes to the client"
    )
    parser.add_argument("--cut-request", help="... of the body of the response to a request containing this")
    parser.add_argument("--cut-connection", type=int, help="... on this connection only (1 = the first)")
    parser.add_argument("--cut-times", type=int, default=1, help="... this many times (0: always)")
    args = parser.parse_args(argv)
    proxy = NetProxy(
        args.upstream,
        rtt_ms=args.rtt_ms,
        rate_mbps=args.rate_mbps,
        up_rate_mbps=args.up_rate_mbps,
        buffer_bytes=args.buffer_kib * 1024,
        bind=args.bind,
        port=args.port,
    )
    if args.cut_after is not None:
        proxy.cut(args.cut_after, args.cut_request, args.cut_connection, args.cut_times or None)
    started = threading.Event()

    def totals() -> dict[str, int]:
        stats = proxy.connections
        return {
            "connections": len(stats),
            "bytes_down": sum(s.bytes_down for s in stats),
            "bytes_up": sum(s.bytes_up for s in stats),
            "cut": sum(s.cut for s in stats),
        }

    async def run() -> None:
        loop = asyncio.get_running_loop()
        serving = loop.create_task(proxy.serve(started))
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, serving.cancel)
        loop.add_signal_handler(signal.SIGUSR1, lambda: print(json.dumps(totals()), flush=True))
        while not started.is_set() and not serving.done():
            await asyncio.sleep(0.01)
        if started.is_set():
            print(f"listening on {proxy.host}", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await serving

    asyncio.run(run())
    print(json.dumps(totals()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
