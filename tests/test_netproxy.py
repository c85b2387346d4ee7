"""The internet-like link of the benchmarks (``bench.netproxy``): its round trips, its per-connection
throughput cap and its cuts do what they claim, measured end to end through real sockets.

Times have a strict lower bound (the link may never be faster than it says) and a generous upper
bound (a loaded 2-core machine may be slower, never faster).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from bench.bench_netproxy import PATTERN, ByteServer, connect, read_response
from bench.netproxy import MB, NetProxy, ProxyProcess
from tests.registry import RegistryServer

SLACK = 1.5  # seconds a loaded machine may add to a timing


@pytest.fixture(scope="module")
def server() -> Iterator[ByteServer]:
    with ByteServer() as byte_server:
        yield byte_server


def wait_for(condition: Callable[[], bool], deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "condition not reached before the deadline"
        time.sleep(0.01)


def get(sock: socket.socket, path: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())


def read_until_error(sock: socket.socket) -> tuple[bytes, type[BaseException] | None]:
    """Everything the connection delivers, and how it ended (None: a clean close)."""
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError as exc:
        return bytes(data), type(exc)
    return bytes(data), None


def test_each_exchange_costs_one_round_trip_and_a_new_connection_one_more(server: ByteServer) -> None:
    rtt, count = 0.05, 10
    with NetProxy(server.host, rtt_ms=rtt * 1000) as proxy:
        start = time.perf_counter()  # before connecting: the emulated handshake starts there
        with connect(proxy.host) as sock:
            get(sock, "/bytes/100")
            read_response(sock)
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(count):
                get(sock, "/bytes/100")
                _, body = read_response(sock)
                assert body == 100
            sequential = time.perf_counter() - start
        assert len(proxy.connections) == 1  # kept alive: one connection for every request
    assert first >= 2 * rtt  # handshake, then the exchange
    assert first < 2 * rtt + SLACK
    assert sequential >= count * rtt
    assert sequential < count * rtt + SLACK


def test_a_download_takes_its_size_over_the_connection_rate(server: ByteServer) -> None:
    size, rate_mbps, rtt = 50 * MB, 25, 0.04
    with NetProxy(server.host, rtt_ms=rtt * 1000, rate_mbps=rate_mbps) as proxy:
        start = time.perf_counter()
        with connect(proxy.host) as sock:
            get(sock, f"/bytes/{size}")
            _, body = read_response(sock)
        elapsed = time.perf_counter() - start
        assert body == size
        wait_for(lambda: proxy.connections[0].closed is not None)
        assert proxy.connections[0].bytes_down > size
    expected = size / (rate_mbps * MB) + 2 * rtt  # 2.08 s
    assert elapsed >= expected
    assert elapsed < expected + SLACK


def test_parallel_connections_each_keep_their_own_cap(server: ByteServer) -> None:
    connections, size, rate_mbps = 4, 25 * MB, 12.5  # 2 s each; a shared cap would need 8 s
    times = [0.0] * connections

    def download(index: int) -> None:
        start = time.perf_counter()
        with connect(proxy.host) as sock:
            get(sock, f"/bytes/{size}")
            _, body = read_response(sock)
        assert body == size
        times[index] = time.perf_counter() - start

    with NetProxy(server.host, rate_mbps=rate_mbps) as proxy:
        threads = [threading.Thread(target=download, args=(i,)) for i in range(connections)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        assert len(proxy.connections) == connections
    single = size / (rate_mbps * MB)
    assert all(t >= single for t in times), times  # each connection is capped...
    assert wall < connections * single / 2, wall  # ...but not all of them together


def test_uploads_are_capped_too(server: ByteServer) -> None:
    size, rate_mbps = 10 * MB, 10
    with NetProxy(server.host, rate_mbps=rate_mbps) as proxy:
        start = time.perf_counter()
        answer = requests.post(f"http://{proxy.host}/upload", data=PATTERN * 10, timeout=60)
        elapsed = time.perf_counter() - start
    assert answer.text == str(len(PATTERN) * 10)
    assert elapsed >= size / (rate_mbps * MB)
    assert elapsed < size / (rate_mbps * MB) + SLACK


def test_a_cut_delivers_exactly_n_bytes_then_a_reset_on_the_selected_connection_only(
    server: ByteServer,
) -> None:
    size, cut_after = 3 * len(PATTERN), 123_457
    with NetProxy(server.host, rtt_ms=10, rate_mbps=50) as proxy:
        rule = proxy.cut(cut_after, connection=2)
        results = []
        for _ in range(3):
            with connect(proxy.host) as sock:
                get(sock, f"/bytes/{size}")
                sock.shutdown(socket.SHUT_WR)  # so that an uncut connection ends with a clean close
                results.append(read_until_error(sock))
        wait_for(lambda: all(c.closed is not None for c in proxy.connections))
        stats = proxy.connections
    (first, first_end), (cut, cut_end), (third, third_end) = results
    assert cut_end is ConnectionResetError
    assert len(cut) == cut_after  # exactly N bytes, headers included, then the reset
    head, _, body = cut.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == PATTERN[: len(body)]
    for data, end in ((first, first_end), (third, third_end)):
        assert end is None
        assert data.partition(b"\r\n\r\n")[2] == PATTERN * 3  # whole and intact
    assert [c.cut for c in stats] == [False, True, False]
    assert stats[1].bytes_down == cut_after
    assert rule.fired == 1


def test_a_cut_in_one_response_body_lets_the_retry_through(server: ByteServer) -> None:
    size, cut_after = 2_000_000, 777_777
    with NetProxy(server.host, rtt_ms=10) as proxy:
        proxy.cut(cut_after, request=f"/bytes/{size} ")
        with connect(proxy.host) as sock:
            get(sock, "/bytes/5000")  # an earlier exchange on the same connection is not counted
            _, earlier = read_response(sock)
            get(sock, f"/bytes/{size}")
            with pytest.raises(ConnectionResetError) as failure:
                read_response(sock)
        with connect(proxy.host) as sock:  # the retry: the rule was spent on the first connection
            get(sock, f"/bytes/{size}")
            _, retried = read_response(sock)
        stats = proxy.connections
    assert earlier == 5000
    assert failure.value.received == cut_after  # type: ignore[attr-defined]
    assert retried == size
    assert [c.cut for c in stats] == [True, False]


def test_a_cut_blob_from_the_real_registry_then_a_whole_one(registry: RegistryServer) -> None:
    """The registry's own blob endpoint, through the link: cut once inside the blob, then whole."""
    ref = registry.push_image({"run.sh": ("#!/bin/sh\n", 0o755), "model.bin": os.urandom(3 * 1024 * 1024)})
    with registry.client() as client:
        layer = max(client.resolve(ref).layers, key=lambda layer: layer.size)
    digest, size = layer.digest, layer.size
    repository = ref.split("/", 1)[1].rsplit(":", 1)[0]
    cut_after = size // 2
    with NetProxy(registry.host, rtt_ms=20, rate_mbps=25) as proxy:
        proxy.cut(cut_after, request=digest)
        path = f"/v2/{repository}/blobs/{digest}"
        with connect(proxy.host) as sock:
            get(sock, path)
            with pytest.raises(ConnectionResetError) as failure:
                read_response(sock)
        url = f"http://{proxy.host}{path}"
        whole = requests.get(url, timeout=60)
        stats = proxy.connections
    assert failure.value.received == cut_after  # type: ignore[attr-defined]
    assert whole.status_code == 200 and len(whole.content) == size
    assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == digest
    assert [c.cut for c in stats] == [True, False]


def test_the_command_line_proxy_forwards_and_stops_on_sigterm(server: ByteServer) -> None:
    with ProxyProcess(server.host, rtt_ms=20, rate_mbps=25) as proxy:
        start = time.perf_counter()
        answer = requests.get(f"http://{proxy.host}/bytes/1000", timeout=60)
        elapsed = time.perf_counter() - start
        assert answer.status_code == 200 and answer.content == PATTERN[:1000]
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(30) == 0
    assert elapsed >= 0.04  # handshake + exchange
