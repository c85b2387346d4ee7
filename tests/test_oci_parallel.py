"""Pulls in concurrent ranged parts against a real docker-registry: order, safety, digests, faults.

Links with latency and cuts come from bench.netproxy's NetProxy; a registry that ignores Range
requests is played by a small loopback proxy here that drops the header on its way up.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backends_app.oci import DigestMismatch, UnsafeArchive
from backends_app.oci.publish import layer_from_tar, push_image
from bench.netproxy import NetProxy
from tests.helpers.processes import wait_until
from tests.registry import Fault, FaultProxy, RegistryServer
from tests.test_oci_unpack import _dir, _file, _symlink, make_tar

pytestmark = pytest.mark.registry

KiB = 1024
MiB = 1024 * 1024
# Small parts, so that small test images are many ranged requests.
PARTS: dict[str, Any] = {"pull_part_size": 64 * KiB, "pull_connections": 8, "pull_layers": 4}


def proxied(ref: str, server: RegistryServer, host: str) -> str:
    return ref.replace(server.host, host)


def files_of(root: Path) -> dict[str, bytes | str]:
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[rel] = path.read_bytes()
    return found


def layered_image() -> tuple[list[bytes], dict[str, bytes | str]]:
    """Four layers of incompressible data with whiteouts and an opaque directory across them."""
    a, b, c, d = (os.urandom(300 * KiB) for _ in range(4))
    layers = [
        make_tar(
            [_dir("lib"), _file("lib/a.so", a), _file("lib/b.so", b), _dir("etc"), _file("etc/old", b"1")]
        ),
        make_tar([_file("lib/.wh.a.so"), _file("bin", c), _symlink("lib/current", "b.so")]),
        make_tar([_dir("etc"), _file("etc/.wh..wh..opq"), _file("etc/new", b"2"), _file("bin", d)]),
        make_tar([_file("run.sh", b"#!/bin/sh\n", 0o755), _file("lib/a.so", b"back again")]),
    ]
    expected: dict[str, bytes | str] = {
        "bin": d,
        "etc/new": b"2",
        "lib/a.so": b"back again",
        "lib/b.so": b,
        "lib/current": "-> b.so",
        "run.sh": b"#!/bin/sh\n",
    }
    return layers, expected


def test_layers_downloaded_concurrently_are_applied_in_order_with_their_whiteouts(
    registry: RegistryServer, tmp_path: Path
) -> None:
    layers, expected = layered_image()
    ref = registry.ref(registry.unique_repo("parallel"))
    with registry.client() as client:
        push_image(client, ref, {"linux/amd64": [layer_from_tar(t) for t in layers]})
    with NetProxy(registry.host, rtt_ms=20, rate_mbps=2) as proxy, registry.client(**PARTS) as client:
        resolved = client.resolve(proxied(ref, registry, proxy.host))
        client.reset_request_counts()
        result = client.pull(resolved, tmp_path / "out")
        connections = len(proxy.connections)
    assert files_of(result.dest) == expected
    assert result.bytes_downloaded == resolved.total_compressed_size
    parts = sum(-(-layer.size // PARTS["pull_part_size"]) for layer in resolved.layers)
    assert client.request_counts == {"GET": parts}  # one GET per part, none twice
    assert connections > 1  # in parallel
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # the private part directory is gone


def test_a_hostile_layer_is_refused_and_leaves_neither_tree_nor_its_parts(
    registry: RegistryServer, tmp_path: Path
) -> None:
    good = layer_from_tar(make_tar([_file("ok", os.urandom(200 * KiB))]))
    lower = layer_from_tar(
        make_tar(
            [_dir("s"), _dir("s/d"), _file("run.sh", os.urandom(200 * KiB)), _symlink("esc", "s/d/../..")]
        )
    )
    upper = layer_from_tar(make_tar([_file("s/.wh.d"), _symlink("s/d", "..")]))
    hostile = layer_from_tar(make_tar([_file("../outside", b"gotcha")]))
    ref = registry.ref(registry.unique_repo("hostile"))
    with registry.client(**PARTS) as client:
        push_image(client, ref, {"linux/amd64": [good, hostile]})
        parent = tmp_path / "private"
        parent.mkdir()
        with pytest.raises(UnsafeArchive, match="outside"):
            client.pull(ref, parent / "out")
        assert list(parent.iterdir()) == []
        # With a lasting blob directory: the hostile blob's parts go, the good layer's may stay.
        blob_dir = tmp_path / "blobs"
        with pytest.raises(UnsafeArchive):
            client.pull(ref, tmp_path / "out", blob_dir=blob_dir)
        assert not (tmp_path / "out").exists()
        left = [p.name for p in blob_dir.iterdir()]
        assert not [name for name in left if hostile.digest.split(":")[1] in name]
        # A link escaping only once every layer is on: all the image's parts go.
        ref2 = registry.ref(registry.unique_repo("hostile"))
        push_image(client, ref2, {"linux/amd64": [lower, upper]})
        with pytest.raises(UnsafeArchive, match="esc"):
            client.pull(ref2, tmp_path / "out2", blob_dir=blob_dir)
        image = (lower.digest.split(":")[1], upper.digest.split(":")[1])
        assert not [p for p in blob_dir.iterdir() if p.name.split(".")[0].split("-")[1] in image]
        assert not (tmp_path / "out2").exists()


def test_a_blob_that_does_not_match_its_digest_is_fetched_once_more_then_refused(
    registry: RegistryServer, tmp_path: Path
) -> None:
    ref = registry.push_image([{"a": os.urandom(1000)}, {"big": os.urandom(500 * KiB)}])
    with registry.client(**PARTS) as client:
        resolved = client.resolve(ref)
        blob = registry.blob_path(resolved.layers[1].digest)
        blob.write_bytes(os.urandom(blob.stat().st_size))  # same size, other bytes
        with NetProxy(registry.host, rtt_ms=0) as proxy:
            with pytest.raises(DigestMismatch, match=resolved.layers[1].digest):
                client.pull(proxied(ref, registry, proxy.host), tmp_path / "out", blob_dir=tmp_path / "blobs")
            down = proxy.bytes_down
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "blobs").iterdir() if resolved.layers[1].digest[7:] in p.name]
    assert down >= 2 * resolved.layers[1].size  # downloaded again once before giving up
    assert down < 3 * resolved.layers[1].size + 200 * KiB


def test_a_connection_cut_mid_part_resumes_with_a_range_request_and_little_downloaded_again(
    registry: RegistryServer, tmp_path: Path
) -> None:
    payload = os.urandom(3 * MiB)
    ref = registry.push_image({"big": payload})
    with registry.client() as client:
        digest = client.resolve(ref).layers[0].digest
    with NetProxy(registry.host, rtt_ms=10) as proxy, registry.client(pull_part_size=1 * MiB) as client:
        # The first request for the blob is cut 600 KiB into its part.
        proxy.cut(600 * KiB, request=digest.split(":")[1], times=1)
        resolved = client.resolve(proxied(ref, registry, proxy.host))
        result = client.pull(resolved, tmp_path / "out")
        cut = [c for c in proxy.connections if c.cut]
        down = proxy.bytes_down
    assert (result.dest / "big").read_bytes() == payload
    assert len(cut) == 1
    size = resolved.total_compressed_size
    assert result.bytes_downloaded == size  # resumed where it was cut: no byte twice
    assert down <= size * 1.05


class RangeBlindProxy:
    """A loopback HTTP proxy to a registry that drops ``Range`` from blob requests, so every answer
    is the whole blob with 200, as some registries and CDNs do. ``no_length``: the body is sent
    without Content-Length, ended by closing the connection."""

    def __init__(self, upstream: str, *, no_length: bool = False) -> None:
        self.upstream = upstream
        self.no_length = no_length
        self.log: list[tuple[str, str | None, int]] = []  # (path, Range asked, status)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.serve(self)

            do_HEAD = do_GET

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        asked = handler.headers.get("Range")
        headers = {
            k: v for k, v in handler.headers.items() if k.lower() not in ("range", "connection", "keep-alive")
        }
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            upstream.request(handler.command, handler.path, headers=headers)
            response = upstream.getresponse()
            self.log.append((handler.path, asked, response.status))
            handler.send_response(response.status)
            blob = "/blobs/" in handler.path and handler.command == "GET"
            for name, value in response.getheaders():
                lower = name.lower()
                if lower in ("connection", "transfer-encoding", "keep-alive"):
                    continue
                if lower == "content-length" and blob and self.no_length:
                    continue
                handler.send_header(name, value)
            if blob and self.no_length:
                handler.send_header("Connection", "close")
                handler.close_connection = True
            handler.end_headers()
            if handler.command == "HEAD":
                return
            while chunk := response.read(64 * KiB):
                handler.wfile.write(chunk)
        except OSError:
            handler.close_connection = True
        finally:
            upstream.close()


@pytest.fixture
def range_blind() -> Iterator[Callable[..., RangeBlindProxy]]:
    made: list[RangeBlindProxy] = []

    def factory(upstream: str, **kwargs: Any) -> RangeBlindProxy:
        made.append(RangeBlindProxy(upstream, **kwargs))
        return made[-1]

    yield factory
    for proxy in made:
        with contextlib.suppress(OSError):
            proxy.stop()


@pytest.mark.parametrize("no_length", [False, True], ids=["with-length", "without-length"])
def test_a_registry_that_ignores_range_still_gives_a_correct_pull_one_stream_per_blob(
    registry: RegistryServer, range_blind: Callable[..., RangeBlindProxy], tmp_path: Path, no_length: bool
) -> None:
    layers, expected = layered_image()
    ref = registry.ref(registry.unique_repo("norange"))
    with registry.client() as client:
        push_image(client, ref, {"linux/amd64": [layer_from_tar(t) for t in layers]})
    proxy = range_blind(registry.host, no_length=no_length)
    with registry.client(**PARTS) as client:
        resolved = client.resolve(proxied(ref, registry, proxy.host))
        result = client.pull(resolved, tmp_path / "out")
        assert files_of(result.dest) == expected
        blob_gets = [entry for entry in proxy.log if "/blobs/" in entry[0]]
        # Ranged requests answered 200 until the client noticed (at most one per connection),
        # then one stream per blob.
        assert len(blob_gets) <= PARTS["pull_connections"] + len(layers)
        # Remembered for the client's life: a second pull asks for no range at all.
        proxy.log.clear()
        again = client.pull(resolved, tmp_path / "again")
        assert files_of(again.dest) == expected
        assert [asked for path, asked, _ in proxy.log if "/blobs/" in path] == [None] * len(layers)
        assert again.bytes_downloaded == resolved.total_compressed_size


def blob_get(method: str, path: str) -> bool:
    return method == "GET" and "/blobs/" in path


def big_file_behind_a_proxy(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy]
) -> tuple[bytes, str, FaultProxy]:
    """An image of one 400 KiB file, and its reference through a fault proxy."""
    payload = os.urandom(400 * KiB)
    ref = registry.push_image({"big": payload})
    proxy = fault_proxy_factory(registry.host)
    return payload, proxied(ref, registry, proxy.host), proxy


def test_a_registry_answering_416_to_a_range_gets_the_blob_in_one_stream(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    payload, ref, proxy = big_file_behind_a_proxy(registry, fault_proxy_factory)
    proxy.add(Fault(blob_get, status=416, times=1))
    with registry.client(**PARTS) as client:
        result = client.pull(ref, tmp_path / "out")
    assert (result.dest / "big").read_bytes() == payload
    statuses = [status for _, method, path, status in proxy.log if "/blobs/" in path]
    assert statuses[0] == 416 and 200 in statuses


class _Cancelled(Exception):
    """What a job's progress callback raises when the job is cancelled."""


def test_a_pull_cancelled_while_the_registry_is_silent_mid_body_stops_at_once(
    registry: RegistryServer, fault_proxy_factory: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    _, ref, proxy = big_file_behind_a_proxy(registry, fault_proxy_factory)
    # Every blob body stops after 1000 bytes and stays silent for ten minutes.
    proxy.add(
        Fault(
            blob_get,
            trickle_after=1000,
            trickle_every=600,
            times=50,
        )
    )
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def progress(_: Any) -> None:
        if cancel.is_set():
            raise _Cancelled()

    def cancel_once_a_body_stalls() -> None:
        # The proxy logs a request once its first bytes are sent; the rest never come.
        wait_until(lambda: any("/blobs/" in path for _, _, path, _ in proxy.log), what="a blob request")
        cancelled_at.append(time.monotonic())
        cancel.set()

    canceller = threading.Thread(target=cancel_once_a_body_stalls, daemon=True)
    canceller.start()
    read_timeout = 300.0
    with registry.client(timeout=(10.0, read_timeout), **PARTS) as client, pytest.raises(_Cancelled):
        client.pull(ref, tmp_path / "out", progress=progress)
    canceller.join()
    stopped_after = time.monotonic() - cancelled_at[0]
    # The thread blocked on the silent body was cut, not waited for until the read timeout.
    assert stopped_after < read_timeout / 5, f"the pull took {stopped_after:.0f} s to stop"
    assert list(tmp_path.iterdir()) == []  # no tree, no part files
