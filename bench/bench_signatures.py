"""Benchmark: verifying a backend image's Sigstore signature, as an install and the check do.

Run: ``.venv/bin/python -m bench.bench_signatures`` (``--images``, ``--via-proxy RTT_MS[:RATE_MBPS]``,
``--no-docs``).

It starts its own ``docker-registry`` on loopback and a Sigstore instance of its own (the tests'
``tests/helpers/sigstore.py``: CA, CT log, transparency log), pushes ``--images`` small images and
signs each as ``cosign sign`` v3 does (a DSSE bundle attached as a referrer, listed in the
``sha256-<hex>`` tag index: the registry has no referrers API). Then it times, per image:

* ``signatures.verify_image`` with a fresh registry client, as an install job has one: the referrers
  lookup, the tag index, the bundle's manifest and blob, then sigstore-python's verification;
* the same with one client kept warm across images, as the check's thread pool shares one;
* sigstore-python's part alone (``verify_bundle`` on the bundle already in memory).

The registry requests are counted by the client. ``--via-proxy`` puts the registry behind
``bench.netproxy`` (its own process), so each request costs that round trip. Results replace the
section between ``<!-- bench:signatures -->`` (or ``<!-- bench:signatures-link -->``) markers in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.netproxy import ProxyProcess, parse_link
from bench.report import write_section

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:signatures -->", "<!-- /bench:signatures -->"
LINK_BEGIN, LINK_END = "<!-- bench:signatures-link -->", "<!-- /bench:signatures-link -->"


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


def p90_ms(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{ordered[max(0, int(len(ordered) * 0.9) - 1)] * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--via-proxy", default="", help="RTT_MS[:RATE_MBPS], e.g. 40:25")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    from backends_app.oci import RegistryClient, RegistryConfig, signatures
    from backends_app.oci.publish import publish_files
    from tests import registry as registry_plugin
    from tests.helpers import sigstore as signing

    workdir = Path(tempfile.mkdtemp(prefix="bench-signatures-"))
    server = registry_plugin.RegistryServer(workdir / "registry").start()
    proxy: ProxyProcess | None = None
    try:
        instance = signing.LocalSigstore("bench")
        root_file = workdir / "trusted_root.json"
        root_file.write_text(json.dumps(instance.trusted_root()))
        root = signatures.load_trusted_root(root_file)
        policy = signatures.Verification.from_json(
            {"issuer": signing.GITHUB_ISSUER, "identity_regex": signing.BUILD_IDENTITY_REGEX}
        )
        images: list[tuple[str, str, bytes]] = []  # (repository:tag, manifest digest, bundle)
        with server.client() as client:
            for i in range(args.images):
                ref = f"{server.host}/bench/signed:v{i}"
                publish_files({"run.sh": (f"#!/bin/sh\necho {i}\n", 0o755)}, ref, client=client)
                subject = signing.manifest_descriptor(server.url, "bench/signed", f"v{i}")
                bundle = instance.sign_digest(subject.digest)
                signing.attach_bundle(server.url, "bench/signed", subject, bundle)
                images.append((f"bench/signed:v{i}", subject.digest, bundle.encode()))
        host = server.host
        if args.via_proxy:
            rtt_ms, rate_mbps = parse_link(args.via_proxy)
            proxy = ProxyProcess(server.host, rtt_ms, rate_mbps).start()
            host = proxy.host
        config = RegistryConfig(timeout=(10.0, 60.0), retries=1)

        cold: list[float] = []
        cold_requests: list[int] = []
        for name, digest, _ in images:
            with RegistryClient(config) as client:
                started = time.perf_counter()
                signatures.verify_image(client, f"{host}/{name}", digest, policy, root)
                cold.append(time.perf_counter() - started)
                cold_requests.append(sum(client.request_counts.values()))
        warm: list[float] = []
        with RegistryClient(config) as client:
            signatures.verify_image(client, f"{host}/{images[0][0]}", images[0][1], policy, root)
            client.reset_request_counts()
            for name, digest, _ in images:
                started = time.perf_counter()
                signatures.verify_image(client, f"{host}/{name}", digest, policy, root)
                warm.append(time.perf_counter() - started)
            warm_requests = client.request_counts
        from sigstore.verify import Verifier

        verifier = Verifier(trusted_root=root)
        crypto: list[float] = []
        for _, digest, bundle_bytes in images:
            started = time.perf_counter()
            signatures.verify_bundle(verifier, bundle_bytes, digest, policy)
            crypto.append(time.perf_counter() - started)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()

    where = (
        f"through `bench.netproxy` ({args.via_proxy}: round trip ms[:MB/s per connection])"
        if args.via_proxy
        else "on loopback"
    )
    per_image = {m: round(v / len(images), 1) for m, v in warm_requests.items()}
    section = "\n".join(
        [
            f"### Signature verification, {where}",
            "",
            f"`python -m bench.bench_signatures --images {args.images}"
            + (f" --via-proxy {args.via_proxy}`" if args.via_proxy else "`")
            + f" on {platform.machine()}, Python {platform.python_version()}: {len(images)} signed images "
            "(DSSE bundles found through the referrers tag index of docker-registry 2.8), the tests' "
            "own Sigstore trust root.",
            "",
            "| what | median | p90 | registry requests per image |",
            "| --- | --- | --- | --- |",
            f"| `verify_image`, fresh client (an install job) | {median_ms(cold)} | {p90_ms(cold)} | "
            f"{statistics.median(cold_requests):.0f} (first contact included) |",
            f"| `verify_image`, shared warm client (the check) | {median_ms(warm)} | {p90_ms(warm)} | "
            f"{', '.join(f'{v:g} {m}' for m, v in per_image.items())} |",
            f"| sigstore-python's verification alone (`verify_bundle`) | {median_ms(crypto)} | "
            f"{p90_ms(crypto)} | 0 |",
        ]
    )
    print(section)
    if not args.no_docs:
        write_section(*((LINK_BEGIN, LINK_END) if args.via_proxy else (BEGIN, END)), section)


if __name__ == "__main__":
    main()
