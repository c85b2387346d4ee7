"""Benchmark: HEAD of many tags over HTTP/1.1 connections (our client) or multiplexed on HTTP/2.

Run: ``.venv/bin/python -m bench.bench_http2`` (``--tags``, ``--rounds``, ``--via-proxy``,
``--no-docs``). Needs ``httpx`` with ``h2`` (``pip install -e '.[bench]'``).

TLS registries (quay.io, ghcr.io, Docker Hub) speak HTTP/2, where one connection carries many
requests at once; our client (``requests``) speaks HTTP/1.1, one request at a time per connection,
so it keeps a pool of ``PORTAL_REGISTRY_CONCURRENCY`` connections per host. Which is faster for an
upgrade check through a distant link?

It starts ``docker-registry`` with TLS (a self-signed certificate made here; Go's server then
offers ``h2`` through ALPN), pushes ``--tags`` small images to one repository, and puts
``bench.netproxy`` in front of it (``--via-proxy``, default 40 ms round trip, 25 MB/s a connection).
Then, alternating, a fresh client each round (a check starts with no connection open):

* ours: ``RegistryClient.head_digest`` for every tag on a pool of N threads (HTTP/1.1, N
  connections opened through the link, each a TCP and a TLS handshake);
* ``httpx`` HTTP/2, N requests in flight multiplexed on one connection;
* ``httpx`` HTTP/2 with 4N in flight on one connection (the registry allows 250 streams);
* ours again with 4N threads and 4N connections, so each protocol is compared at the same number
  of requests in flight.

CPU time of this process and of the registry is measured too: on a 2-core machine they share the
CPUs with the proxy. Results go between ``<!-- bench:http2 -->`` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import ipaddress
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.bench_check import ACCEPT, PLATFORM, process_cpu, setup_django
from bench.netproxy import ProxyProcess, parse_link
from bench.report import write_section

BEGIN, END = "<!-- bench:http2 -->", "<!-- /bench:http2 -->"
#: HTTP/2 has to beat the HTTP/1.1 pool by this much to be worth switching the client.
CLEAR_WIN = 1.25


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "registry.crt", directory / "registry.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def start_tls_registry(workdir: Path) -> Any:
    """The tests' RegistryServer with ``http.tls`` in its config."""
    from tests import registry as registry_plugin

    cert, key = make_certificate(workdir)
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE

    class TLSRegistry(registry_plugin.RegistryServer):
        @property
        def url(self) -> str:
            return f"https://{self.host}"

        def _write_config(self) -> Path:
            config = super()._write_config()
            tls = f"  tls:\n    certificate: {cert}\n    key: {key}\n"
            text = config.read_text().replace("  secret: ", tls + "  secret: ", 1)
            config.write_text(text)
            return config

        def _wait_ready(self) -> None:
            deadline = time.monotonic() + registry_plugin.STARTUP_DEADLINE
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(f"exited with {self._process.returncode}: {self._log_tail()}")
                try:
                    with urllib.request.urlopen(f"{self.url}/v2/", timeout=10, context=unverified):
                        return
                except OSError:
                    time.sleep(0.05)  # poll interval, bounded by the deadline above
            raise RuntimeError(f"no answer on {self.url}/v2/: {self._log_tail()}")

    if not os.path.exists(registry_plugin.REGISTRY_BINARY):
        raise SystemExit(f"{registry_plugin.REGISTRY_BINARY} is missing (apt-get install docker-registry)")
    return TLSRegistry(workdir / "registry").start()


def push_tags(host: str, count: int) -> tuple[str, list[str]]:
    from backends_app.oci import RegistryClient, RegistryConfig
    from backends_app.oci.publish import publish_files

    repo = "bench/backends"
    tags = [f"v-backend-{i:04d}" for i in range(count)]
    with RegistryClient(RegistryConfig(timeout=(10.0, 60.0))) as client:
        for i, tag in enumerate(tags):
            files: dict[str, Any] = {"run.sh": ("#!/bin/sh\necho ok\n", 0o755), "build.txt": f"backend {i}"}
            publish_files(files, f"{host}/{repo}:{tag}", client=client, platforms=[PLATFORM])
    return repo, tags


def run_ours(host: str, repo: str, tags: list[str], in_flight: int) -> float:
    from backends_app.oci import RegistryClient, RegistryConfig

    started = time.perf_counter()
    config = RegistryConfig(timeout=(10.0, 60.0), max_in_flight=in_flight)
    with (
        RegistryClient(config) as client,
        concurrent.futures.ThreadPoolExecutor(in_flight) as pool,
    ):
        digests = list(pool.map(client.head_digest, [f"{host}/{repo}:{tag}" for tag in tags]))
    assert all(digests)
    return time.perf_counter() - started


def run_http2(host: str, repo: str, tags: list[str], in_flight: int) -> float:
    import httpx

    async def check() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(http2=True, verify=False, limits=limits, timeout=60.0) as client:
            gate = asyncio.Semaphore(in_flight)

            async def head(tag: str) -> None:
                async with gate:
                    response = await client.head(
                        f"https://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}
                    )
                assert response.status_code == 200 and response.headers["Docker-Content-Digest"]
                assert response.http_version == "HTTP/2", response.http_version

            await asyncio.gather(*(head(tag) for tag in tags))

    started = time.perf_counter()
    asyncio.run(check())
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", type=int, default=900)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--via-proxy", metavar="RTT_MS[:RATE_MBPS]", default="40:25")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args(argv)
    try:
        import h2  # noqa: F401
        import httpx  # noqa: F401
    except ImportError:
        raise SystemExit("httpx and h2 are missing: pip install -e '.[bench]'") from None

    workdir = Path(tempfile.mkdtemp(prefix="bench-http2-"))
    server = None
    proxy = None
    try:
        setup_django(workdir)
        from django.conf import settings

        n = settings.PORTAL_REGISTRY_CONCURRENCY
        server = start_tls_registry(workdir)
        print(f"pushing {args.tags} tags to https://{server.host} ...", flush=True)
        repo, tags = push_tags(server.host, args.tags)
        rtt_ms, rate_mbps = parse_link(args.via_proxy)
        proxy = ProxyProcess(server.host, rtt_ms, rate_mbps).start()
        host = proxy.host
        approaches = {
            f"ours: HTTP/1.1, `requests`, {n} connections, {n} in flight": lambda: run_ours(
                host, repo, tags, n
            ),
            f"`httpx` HTTP/2, one connection, {n} in flight": lambda: run_http2(host, repo, tags, n),
            f"`httpx` HTTP/2, one connection, {4 * n} in flight": lambda: run_http2(host, repo, tags, 4 * n),
            f"ours: HTTP/1.1, `requests`, {4 * n} connections, {4 * n} in flight": lambda: run_ours(
                host, repo, tags, 4 * n
            ),
        }
        for run in approaches.values():  # warm-up: imports, the registry's caches
            run()
        times: dict[str, list[float]] = {name: [] for name in approaches}
        cpu: dict[str, list[float]] = {name: [] for name in approaches}
        registry_cpu: dict[str, list[float]] = {name: [] for name in approaches}
        connections: dict[str, list[int]] = {name: [] for name in approaches}
        registry_pid = server._process.pid
        load_before = os.getloadavg()[0]
        for round_number in range(args.rounds):
            order = list(approaches) if round_number % 2 == 0 else list(reversed(approaches))
            for name in order:
                opened, mine, theirs = (
                    proxy.stats()["connections"],
                    time.process_time(),
                    process_cpu(registry_pid),
                )
                times[name].append(approaches[name]())
                cpu[name].append(time.process_time() - mine)
                registry_cpu[name].append(process_cpu(registry_pid) - theirs)
                connections[name].append(proxy.stats()["connections"] - opened)
            print(
                f"round {round_number + 1}: " + ", ".join(f"{times[k][-1]:.2f}s" for k in approaches),
                flush=True,
            )
        load_after = os.getloadavg()[0]

        ours_name, h2_name, h2_wide, ours_wide = list(approaches)
        median = {name: statistics.median(times[name]) for name in approaches}
        ours_s = median[ours_name]
        # What switching would buy: the fastest HTTP/2 set-up against the client as the product runs it.
        best_h2 = min(median[h2_name], median[h2_wide])
        gain = ours_s / best_h2
        verdict = (
            f"HTTP/2 wins clearly ({gain:.2f}x): worth switching the client"
            if gain >= CLEAR_WIN
            else f"HTTP/2 does not win clearly ({gain:.2f}x, {CLEAR_WIN:g}x needed): the client stays on "
            "`requests` and HTTP/1.1"
        )
        decision = (
            f"{verdict}. The fastest HTTP/2 set-up against ours as configured ({n} in flight): "
            f"{gain:.2f}x; like for like at {n} in flight: {median[ours_name] / median[h2_name]:.2f}x. "
            f"HTTP/1.1 with {4 * n} connections is the slowest ({median[ours_name] / median[ours_wide]:.2f}x "
            f"ours at {n}): {4 * n} TLS handshakes and {4 * n} threads cost CPU the registry and the "
            "proxy need on the same 2 cores"
        )
        rows = "\n".join(
            f"| {name} | {statistics.median(times[name]):.2f} s | "
            f"{statistics.median(times[name]) / len(tags) * 1000:.2f} ms | "
            f"{statistics.median(cpu[name]):.2f} s | {statistics.median(registry_cpu[name]):.2f} s | "
            f"{max(connections[name])} | {ours_s / statistics.median(times[name]):.2f}x |"
            for name in approaches
        )
        rate = f", {rate_mbps:g} MB/s" if rate_mbps else ""
        trips = -(-len(tags) // n)
        rounds = "; ".join(f"{name} {', '.join(f'{t:.2f}' for t in times[name])} s" for name in approaches)
        section = f"""\
## HTTP/2 against HTTP/1.1 for the check's HEADs (`bench/bench_http2.py`)

`python -m bench.bench_http2 --tags {len(tags)} --rounds {args.rounds} --via-proxy {args.via_proxy}` \
({time.strftime("%Y-%m-%d")}, {os.cpu_count()} CPU(s)): `docker-registry` with TLS (a self-signed \
certificate; Go's server negotiates `h2` by ALPN, and every HTTP/2 answer was checked to be one), \
{len(tags)} tags in one repository, reached through `bench.netproxy` at {rtt_ms:g} ms round trip{rate} \
per connection. A fresh client each round (a check starts with no connection open, so the \
handshakes count); medians of {args.rounds} rounds in alternating order after a warm-up; load \
average {load_before:.1f} before, {load_after:.1f} after.

| approach | time for {len(tags)} HEADs | per tag | client CPU | registry CPU | connections | vs ours |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{rows}

Rounds: {rounds}.

Decision: {decision}.

Why: with {n} requests in flight either way, both pay about {trips} round trips
({trips * rtt_ms / 1000:.2f} s at {rtt_ms:g} ms); HTTP/1.1 adds one TCP and one TLS handshake
per connection, all opened at once, so about two round trips once. Beyond that the CPU
decides (client, registry and proxy share 2 cores), so more streams on one connection gain little,
and a dependency and a second HTTP stack for the registry client are not worth that. Load from other
work on the machine moves these numbers by tens of percent between rounds: compare within a round.
"""
        print(section)
        if not args.no_docs:
            write_section(BEGIN, END, section)
        return 0
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
