"""Benchmark: publishing a ~256 MiB backend (small blobs through oras-py) against the previous uploader.

Run: ``.venv/bin/python -m bench.bench_publish`` (``--size-mib``, ``--rounds``, ``--chunk-mib``,
``--no-docs``).

It starts its own ``docker-registry`` on loopback and builds, once, the one gzip layer ``publish()``
makes of a directory, from bench_pull's content (random binaries, semi-compressible libraries, many
small source files, a nearly all-zero data file). Then it pushes the image (layer, config,
manifest), alternately and ``--rounds`` times each, every push to a fresh repository so the layer
really goes up:

* ours: ``publish.push_image`` (what ``publish()`` runs once the layer is built): blobs up to
  ``upload.CHUNK_SIZE`` through oras-py's upload protocol on our client (``POST`` + one ``PUT``),
  larger ones streamed in one ``PUT`` by the client;
* previous: the uploader this replaced, kept here verbatim as :func:`previous_push_image` and
  :func:`previous_push_blob` (``HEAD``, ``POST``, then one ``PUT`` streaming the file).

Both send every exchange through the same ``RegistryClient`` and push manifests with the same
code, so the difference is the upload protocol and oras-py's own work. Each push runs in a fresh
child process that reports its push time, peak RSS (``VmHWM``) and request counts; oras-py's
one-time import is timed apart. The results replace the section between ``<!-- bench:publish -->``
markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from backends_app.oci import RegistryClient, RegistryConfig
from backends_app.oci.errors import NotFound, OCIError, RegistryUnavailable
from backends_app.oci.manifest import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    VERSION_ANNOTATION,
    Platform,
)
from backends_app.oci.publish import LayerBlob, _digest, _json_bytes, _push_manifest, write_layer
from backends_app.oci.reference import Reference, parse_reference
from bench.bench_pull import (
    _default_workdir,
    _text_corpus,
    _vm_hwm_kib,
    binaries_layer,
    data_layer,
    libraries_layer,
    sources_layer,
)
from bench.report import record_goal

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:publish -->", "<!-- /bench:publish -->"
MiB = 1024 * 1024
PLATFORM = "linux/amd64"
GOAL = 1.05


# -- the previous uploader (the baseline), as it was in backends_app/oci/publish.py --------------


def previous_push_blob(
    client: RegistryClient, ref: Reference, digest: str, size: int, opener: Callable[[], IO[bytes]]
) -> None:
    """Upload a blob unless the repository has it: ``POST`` an upload, then ``PUT ?digest=``.

    ``opener()`` returns a fresh binary file for each attempt (a retry resends the body).
    """
    try:
        client._request("HEAD", ref, f"blobs/{digest}", what="blob", actions="pull,push").close()
        return
    except NotFound:
        pass
    response = client._request("POST", ref, "blobs/uploads/", what="upload", actions="pull,push", ok=(202,))
    response.close()
    location = response.headers.get("Location")
    if not location:
        raise OCIError(f"{ref.name}: registry gave no upload location")
    parts = urllib.parse.urlsplit(location)
    query = [*urllib.parse.parse_qsl(parts.query, keep_blank_values=True), ("digest", digest)]
    location = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    opened: list[IO[bytes]] = []

    def body() -> IO[bytes]:
        handle = opener()
        opened.append(handle)
        return handle

    try:
        client._request(
            "PUT",
            ref,
            location,
            what="blob upload",
            actions="pull,push",
            headers={"Content-Type": "application/octet-stream"},
            body=body,
            ok=(201, 204),
        ).close()
    except (RegistryUnavailable, NotFound):
        # A retried PUT finds its upload already completed (the first answer was lost): fine
        # if the blob is there now.
        try:
            client._request("HEAD", ref, f"blobs/{digest}", what="blob", actions="pull,push").close()
        except OCIError:
            pass
        else:
            return
        raise
    finally:
        for handle in opened:
            handle.close()


def previous_push_image(
    client: RegistryClient,
    ref: str | Reference,
    images: Mapping[str, Sequence[LayerBlob]],
    *,
    version: str | None = None,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    docker: bool = False,
    force_index: bool = False,
) -> str:
    """Push one image per platform (``{"linux/amd64": [layers...]}``) and return the tag's digest.

    One platform gives a plain manifest under the tag (unless ``force_index``); several give
    per-platform manifests pushed by digest and an index (OCI, or a Docker manifest list when
    ``docker``) under the tag.
    """
    reference = parse_reference(ref)
    if not images:
        raise OCIError("nothing to push: no platforms")
    all_annotations = dict(annotations or {})
    all_labels = dict(labels or {})
    if version:
        all_annotations[VERSION_ANNOTATION] = version
        all_labels[VERSION_ANNOTATION] = version
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    config_type = DOCKER_CONFIG if docker else OCI_CONFIG
    entries: list[dict[str, Any]] = []
    for platform_text, layers in images.items():
        platform = Platform.parse(platform_text)
        for layer in layers:
            previous_push_blob(client, reference, layer.digest, layer.size, layer.open)
        config: dict[str, Any] = {
            **platform.as_descriptor(),
            "config": {"Labels": all_labels} if all_labels else {},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created_by": "backend-portal publish"} for _ in layers],
        }
        config_bytes = _json_bytes(config)
        config_digest = _digest(config_bytes)
        previous_push_blob(
            client, reference, config_digest, len(config_bytes), functools.partial(io.BytesIO, config_bytes)
        )
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config_bytes)},
            "layers": [
                {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
        }
        if all_annotations and not docker:
            manifest["annotations"] = all_annotations
        manifest_bytes = _json_bytes(manifest)
        entries.append(
            {
                "mediaType": manifest_type,
                "digest": _digest(manifest_bytes),
                "size": len(manifest_bytes),
                "platform": platform.as_descriptor(),
                "_body": manifest_bytes,
            }
        )
    tag = reference.tag or reference.digest or "latest"
    if len(entries) == 1 and not force_index:
        entry = entries[0]
        return _push_manifest(client, reference, tag, manifest_type, entry["_body"])
    for entry in entries:
        _push_manifest(client, reference, entry["digest"], manifest_type, entry["_body"])
    index: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST if docker else OCI_INDEX,
        "manifests": [{k: v for k, v in entry.items() if k != "_body"} for entry in entries],
    }
    if all_annotations and not docker:
        index["annotations"] = all_annotations
    return _push_manifest(client, reference, tag, index["mediaType"], _json_bytes(index))


# -- the image ---------------------------------------------------------------------------------


def build_layer(workdir: Path, size_mib: int) -> LayerBlob:
    """One gzip layer of bench_pull's content, as ``publish()`` makes one layer of a directory:
    random binaries, semi-compressible libraries, many small source files and a nearly all-zero
    data file, a quarter of ``size_mib`` (uncompressed) each."""
    budget = size_mib * MiB // 4
    corpus = _text_corpus(random.Random(1), 2 * MiB)
    entries = itertools.chain(
        binaries_layer(budget),
        libraries_layer(budget, corpus),
        sources_layer(budget, corpus),
        data_layer(budget),
    )
    path = workdir / "layer.tar.gz"
    with open(path, "wb") as out:
        digest, size, diff_id, media_type = write_layer(entries, out)
    return LayerBlob(digest, size, diff_id, media_type, path=path)


def _save_layer(layer: LayerBlob, path: Path) -> None:
    path.write_text(json.dumps([layer.digest, layer.size, layer.diff_id, layer.media_type, str(layer.path)]))


def _load_layer(path: str) -> LayerBlob:
    digest, size, diff_id, media_type, file = json.loads(Path(path).read_text())
    return LayerBlob(digest, size, diff_id, media_type, path=Path(file))


# -- one push, in a child process ------------------------------------------------------------------


def child_push(side: str, ref: str, layer_file: str, chunk_mib: str) -> None:
    """Runs in a child process: one push of the image by ``side``; prints a JSON line."""
    layer = _load_layer(layer_file)
    import_seconds = 0.0
    push: Callable[..., str]
    if side == "ours":
        started = time.perf_counter()
        from backends_app.oci import upload  # loaded by the first push; timed apart

        import_seconds = time.perf_counter() - started
        upload.CHUNK_SIZE = int(chunk_mib) * MiB
        from backends_app.oci.publish import push_image as push
    else:
        push = previous_push_image
    started = time.perf_counter()
    with RegistryClient(RegistryConfig(timeout=(5.0, 120.0))) as client:
        digest = push(client, ref, {PLATFORM: [layer]}, version="1.0.0")
        counts = client.request_counts
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "import_seconds": import_seconds,
                "vm_hwm_kib": _vm_hwm_kib(),
                "digest": digest,
                "requests": counts,
            }
        )
    )


def run_child(side: str, ref: str, layer_file: Path, chunk_mib: int) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_publish", "--child", side, ref, str(layer_file), str(chunk_mib)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"{side} push failed: {proc.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    data["wall"] = time.perf_counter() - started
    return data


# -- a remote-looking registry ---------------------------------------------------------------------


class SlowLink:
    """A TCP relay on loopback that makes the registry look remote: every byte arrives half a round
    trip late in each direction, and each connection carries at most ``mib_per_s`` each way (with a
    4 MiB buffer, as a real path has). Real registries are 20-100 ms away and cap each connection;
    loopback hides both."""

    PIECE = 256 * 1024

    def __init__(self, upstream: str, rtt_ms: float, mib_per_s: float) -> None:
        self.upstream = upstream
        self.delay = rtt_ms / 2000.0
        self.rate = mib_per_s * MiB
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._threads: list[threading.Thread] = []
        self._stopped = False

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> SlowLink:
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            host, port = self.upstream.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for source, target in ((client, server), (server, client)):
                pieces: queue.Queue[tuple[float, bytes] | None] = queue.Queue(maxsize=4 * MiB // self.PIECE)
                self._spawn(self._read, source, pieces)
                self._spawn(self._write, target, pieces)

    def _read(self, source: socket.socket, pieces: queue.Queue[tuple[float, bytes] | None]) -> None:
        try:
            while data := source.recv(self.PIECE):
                pieces.put((time.monotonic(), data))
        except OSError:
            pass
        pieces.put(None)

    def _write(self, target: socket.socket, pieces: queue.Queue[tuple[float, bytes] | None]) -> None:
        free_at = 0.0
        try:
            while (item := pieces.get()) is not None:
                arrived, data = item
                start = max(arrived + self.delay, free_at)
                wait = start - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                target.sendall(data)
                free_at = start + len(data) / self.rate
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass


# -- report ----------------------------------------------------------------------------------------


def write_docs(section: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)


def _requests(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {method}" for method, n in sorted(counts.items()))


def _rounds(
    host: str, label: str, rounds: int, layer_file: Path, chunk_mib: int
) -> dict[str, list[dict[str, Any]]]:
    """``rounds`` pushes per side through ``host``, alternating which side goes first."""
    results: dict[str, list[dict[str, Any]]] = {"previous": [], "ours": []}
    for round_no in range(rounds):
        order = ("previous", "ours") if round_no % 2 == 0 else ("ours", "previous")
        for side in order:
            ref = f"{host}/bench/{label}-{side}-{round_no}:v1"
            results[side].append(run_child(side, ref, layer_file, chunk_mib))
        print(
            f"  {label} round {round_no + 1}: ours {results['ours'][-1]['seconds']:.2f}s, "
            f"previous {results['previous'][-1]['seconds']:.2f}s",
            flush=True,
        )
    return results


def _row(label: str, results: dict[str, list[dict[str, Any]]]) -> tuple[str, float]:
    best = {side: min(r["seconds"] for r in runs) for side, runs in results.items()}
    median = {side: statistics.median(r["seconds"] for r in runs) for side, runs in results.items()}
    ratio = best["ours"] / best["previous"]
    row = (
        f"| {label} | {len(results['ours'])} | {best['ours']:.2f} s | {best['previous']:.2f} s "
        f"| **{ratio:.2f}** | {median['ours']:.2f} s | {median['previous']:.2f} s "
        f"| {median['ours'] / median['previous']:.2f} |"
    )
    return row, ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=256, help="uncompressed size of the tree")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per side on loopback")
    parser.add_argument(
        "--link",
        default="40,40",
        help="RTT_MS,MIB_PER_S of the emulated remote registry, or 'none' (default: 40 ms, 40 MiB/s)",
    )
    parser.add_argument("--link-rounds", type=int, default=3, help="rounds per side through the link")
    parser.add_argument("--chunk-mib", type=int, help="ours: upload.CHUNK_SIZE in MiB (default: as shipped)")
    parser.add_argument("--no-docs", action="store_true", help="print the results only")
    parser.add_argument(
        "--workdir", help="registry storage and the layer file (default: /dev/shm when it has room)"
    )
    parser.add_argument("--child", nargs=4, metavar=("SIDE", "REF", "LAYER", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_push(*args.child)
        return 0
    if args.chunk_mib is None:
        from backends_app.oci import upload

        args.chunk_mib = upload.CHUNK_SIZE // MiB
    link = None if args.link == "none" else tuple(float(x) for x in args.link.split(","))

    from tests.registry import REGISTRY_BINARY, RegistryServer

    if not os.path.exists(REGISTRY_BINARY):
        print(f"missing tool: {REGISTRY_BINARY}", file=sys.stderr)
        return 2
    base_dir = args.workdir or _default_workdir()
    load_before = os.getloadavg()[0]
    scenarios: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-publish-", dir=base_dir) as tmp:
        workdir = Path(tmp)
        server = RegistryServer(workdir / "registry").start()
        try:
            print(f"registry on {server.host}; building a {args.size_mib} MiB layer", flush=True)
            started = time.perf_counter()
            layer = build_layer(workdir, args.size_mib)
            build_seconds = time.perf_counter() - started
            print(f"  {layer.size / MiB:.1f} MiB gzip in {build_seconds:.1f}s", flush=True)
            layer_file = workdir / "layer.json"
            _save_layer(layer, layer_file)
            scenarios["loopback"] = _rounds(server.host, "loopback", args.rounds, layer_file, args.chunk_mib)
            if link is not None:
                slow = SlowLink(server.host, *link).start()
                try:
                    scenarios["link"] = _rounds(
                        slow.host, "link", args.link_rounds, layer_file, args.chunk_mib
                    )
                finally:
                    slow.stop()
        finally:
            server.stop()

    digests = {r["digest"] for results in scenarios.values() for runs in results.values() for r in runs}
    if len(digests) != 1:
        print(f"the two uploaders pushed different images: {sorted(digests)}", file=sys.stderr)
        return 1
    loopback = scenarios["loopback"]
    rows = []
    row, ratio = _row("loopback", loopback)
    rows.append(row)
    if "link" in scenarios:
        rtt, rate = link or (0.0, 0.0)
        rows.append(_row(f"{rtt:.0f} ms away, {rate:.0f} MiB/s a connection", scenarios["link"])[0])
    verdict = "met" if ratio <= GOAL else "**not met**"
    record_goal("publish on loopback: ours / previous uploader", ratio, f"<= {GOAL}", ratio <= GOAL)
    ours, previous = loopback["ours"], loopback["previous"]
    rss = {side: max(r["vm_hwm_kib"] for r in runs) / 1024 for side, runs in loopback.items()}
    wall = {side: statistics.median(r["wall"] for r in runs) for side, runs in loopback.items()}
    import_ms = statistics.median(r["import_seconds"] for r in ours) * 1000
    table = "\n".join(rows)
    patches = ours[0]["requests"].get("PATCH", 0)
    section = f"""## Publish: small blobs through oras-py, large layers streamed

`python -m bench.bench_publish` ({time.strftime("%Y-%m-%d")}, {os.cpu_count()} cores, registry storage and the
layer file under `{base_dir or tempfile.gettempdir()}`, load average {load_before:.1f} when it started: the
machine is shared, so compare the two columns of one run rather than runs with each other).

Image: what `publish()` makes of a {args.size_mib} MiB backend tree (bench_pull's content: random
binaries, semi-compressible libraries, many small source files, a nearly all-zero data file): one
gzip layer of {layer.size / MiB:.1f} MiB, a config and a manifest. The layer is built once
({build_seconds:.1f} s, the same code for both sides, not timed). Each push goes to a fresh repository,
alternating which side goes first; both sides pushed the same digest. Ours: blobs up to
{args.chunk_mib} MiB (the config) through oras-py's upload on our client, larger ones (the layer)
streamed in one `PUT` by the client. Previous: `HEAD`, `POST`, one `PUT` streaming the file, for
every blob.

| registry | rounds | ours, best | previous, best | ratio | ours, median | previous, median | ratio |
|---|---|---|---|---|---|---|---|
{table}

Goal: ours <= {GOAL} x previous on loopback (best of the rounds): {verdict}. The second row goes through
a relay that delays every byte by half the round trip each way and caps each connection.
Why large layers do not go through oras: its one-`PUT` path reads the blob into memory whole, and
its chunked path (one `PATCH` per chunk, each waiting for the answer before the next chunk is read)
measured 1.11x the streamed `PUT` on loopback and through the 40 ms relay with 16 MiB chunks
({patches} `PATCH` requests in this run: none).

On loopback: peak RSS {rss["ours"]:.0f} MiB ours, {rss["previous"]:.0f} MiB previous; requests
{_requests(ours[0]["requests"])} ours, {_requests(previous[0]["requests"])} previous; child process
wall time (median, with interpreter start-up) {wall["ours"]:.2f} s ours, {wall["previous"]:.2f} s
previous. Push time runs from creating the client to the tag's digest (blobs, config, manifest).
Ours also loads oras-py and jsonschema once per process, on its first push: {import_ms:.0f} ms here,
outside the push time and inside the wall time.
"""
    print()
    print(section)
    if not args.no_docs:
        write_docs(section)
        print(f"written to {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
