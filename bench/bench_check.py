"""Benchmark: the upgrade check of 500 installed backends when nothing changed.

Run: ``.venv/bin/python -m bench.bench_check`` (``--backends``, ``--rounds``, ``--skopeo-sample``,
``--no-docs``).

It starts its own ``docker-registry`` on loopback with its metrics on, pushes one small image per
tag (500 tags in one repository, as LocalAI's gallery keeps its backends), and records them as
installed in a throwaway SQLite database (``DATABASE_URL`` and ``PORTAL_DATA_DIR`` point into a
temporary directory). Then, in the same run, it times:

* ours: ``detection.find_upgrades()`` end to end (rows read, registry lookups on the thread pool, verdicts
  written), with a fresh registry client per round as a scheduled run has;
* (a) ``skopeo inspect --tls-verify=false docker://...`` per tag, sequentially, on a sample of
  ``--skopeo-sample`` tags, extrapolated per tag to all of them;
* (b) a sequential loop of HEAD requests over one ``requests`` session;
* (c) the registry's ceiling: bare ``urllib3`` HEADs on as many threads as ours uses, the least
  client CPU possible, so the result says how much of the gap is the registry's own limit.

CPU time is measured for our process and for the registry (``/proc``): on a 2-core machine the
registry and the client share the same two CPUs, and that bounds any speed-up. The requests each
approach made are counted on the registry side, from its Prometheus request counters. Results
replace the section between ``<!-- bench:check -->`` markers in docs/benchmarks.md.

``--via-proxy RTT_MS[:RATE_MBPS]`` (for instance ``40:25``) puts every approach behind
``bench.netproxy`` (its own process), so each request costs that round trip as with a distant
registry; then the waiting, not the CPU, bounds a check. Those results go between
``<!-- bench:check-link -->`` markers.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.netproxy import ProxyProcess, parse_link
from bench.report import record_goal, write_section

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:check -->", "<!-- /bench:check -->"
PLATFORM = "linux/amd64"
ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)
GOAL_SKOPEO, GOAL_HEAD_LOOP = 20.0, 3.0
LINK_BEGIN, LINK_END = "<!-- bench:check-link -->", "<!-- /bench:check-link -->"
LINK_GOAL_SKOPEO, LINK_GOAL_HEAD_LOOP = 50.0, 12.0  # through the link, where waiting dominates


def setup_django(workdir: Path) -> None:
    """A throwaway SQLite database and data folder, migrated; nothing else is touched."""
    os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'bench.sqlite3'}"
    os.environ["PORTAL_DATA_DIR"] = str(workdir / "data")
    os.environ["PORTAL_GALLERIES"] = "bench=file:///nonexistent/index.yaml"
    os.environ.setdefault("PORTAL_LOG_LEVEL", "WARNING")
    os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def start_registry(workdir: Path) -> Any:
    """The tests' RegistryServer with its Prometheus metrics on (the registry's own request count).

    Counting from metrics rather than the access log keeps the registry's per-request CPU what it
    is in production: writing an access log line costs it CPU on every request.
    """
    from tests import registry as registry_plugin

    metrics_port = registry_plugin.free_port()

    class CountingRegistry(registry_plugin.RegistryServer):
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

        def _write_config(self) -> Path:
            config = super()._write_config()
            debug = (
                f"  debug:\n    addr: 127.0.0.1:{metrics_port}\n"
                "    prometheus:\n      enabled: true\n      path: /metrics\n"
            )
            text = re.sub(
                r"(\n  secret: [^\n]*\n)", lambda m: m.group(1) + debug, config.read_text(), count=1
            )
            config.write_text(text)
            return config

    registry_plugin.require_registry_binary = lambda: None  # a clear error below beats a pytest skip
    if not os.path.exists(registry_plugin.REGISTRY_BINARY):
        raise SystemExit(f"{registry_plugin.REGISTRY_BINARY} is missing (apt-get install docker-registry)")
    return CountingRegistry(workdir / "registry").start()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RegistryCounts:
    """Requests the registry answered, by method, since the last mark (its Prometheus counters)."""

    _LINE = re.compile(r"^registry_http_requests_total\{([^}]*)\} ([0-9.e+]+)$", re.M)

    def __init__(self, url: str) -> None:
        self.url = url
        self.base: collections.Counter[str] = collections.Counter()

    def _read(self) -> collections.Counter[str]:
        import urllib.request

        with urllib.request.urlopen(self.url, timeout=10) as response:  # loopback only
            text = response.read().decode()
        totals: collections.Counter[str] = collections.Counter()
        for labels, value in self._LINE.findall(text):
            method = re.search(r'method="([a-z]+)"', labels)
            if method:
                totals[method.group(1).upper()] += int(float(value))
        return totals

    def mark(self) -> None:
        self.base = self._read()

    def counts(self) -> dict[str, int]:
        now = self._read()
        return {m: now[m] - self.base[m] for m in now if now[m] - self.base[m]}


def push_tags(server: Any, count: int) -> tuple[str, list[tuple[str, str]]]:
    """One small image per tag in one repository; returns (repository, [(tag, digest)])."""
    from backends_app.oci.publish import FileSpec, publish_files

    repo = "bench/backends"
    tags = []
    with server.client() as client:
        for i in range(count):
            tag = f"latest-backend-{i:04d}"
            ref = f"{server.host}/{repo}:{tag}"
            files: dict[str, FileSpec] = {
                "run.sh": ("#!/bin/sh\necho ok\n", 0o755),
                "build.txt": f"backend {i}",
            }
            publish_files(files, ref, client=client, platforms=[PLATFORM])
            tags.append((tag, client.head_digest(ref)))
    return repo, tags


def record_installed(host: str, repo: str, tags: list[tuple[str, str]]) -> None:
    """Gallery entries and installed rows for every tag, as an install would leave them."""
    from django.utils import timezone

    from backends_app.models import Backend, Gallery, InstalledVersion, Node

    gallery = Gallery.objects.create(name="bench-gallery", url="file:///nonexistent/bench.yaml")
    node = Node.objects.create(name="bench-node", platform=PLATFORM, backends_path="/nonexistent")
    backends = Backend.objects.bulk_create(
        Backend(gallery=gallery, name=f"backend-{i:04d}", uri=f"{host}/{repo}:{tag}", position=i)
        for i, (tag, _) in enumerate(tags)
    )
    InstalledVersion.objects.bulk_create(
        InstalledVersion(
            node=node,
            backend=backend,
            name=backend.name,
            uri=backend.uri,
            digest=digest,
            installed_at=timezone.now(),
            path=f"/nonexistent/{backend.name}",
        )
        for backend, (_, digest) in zip(backends, tags, strict=True)
    )


def run_ours() -> tuple[float, Any]:
    from backends_app import detection, registry

    started = time.perf_counter()
    with registry.client_from_settings(PLATFORM) as client:
        report = detection.find_upgrades(sync_galleries=False, client=client)
    return time.perf_counter() - started, report


def run_skopeo(host: str, repo: str, tags: list[str]) -> float:
    started = time.perf_counter()
    for tag in tags:
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{host}/{repo}:{tag}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return time.perf_counter() - started


def run_head_loop(host: str, repo: str, tags: list[str]) -> float:
    import requests

    started = time.perf_counter()
    with requests.Session() as session:
        for tag in tags:
            response = session.head(f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
            response.raise_for_status()
            assert response.headers["Docker-Content-Digest"]
    return time.perf_counter() - started


def run_ceiling(host: str, repo: str, tags: list[str], threads: int) -> float:
    """The registry's own limit: bare urllib3 HEADs on `threads` threads (the least client CPU)."""
    import concurrent.futures

    import urllib3

    hostname, _, port = host.rpartition(":")
    pool = urllib3.HTTPConnectionPool(hostname, int(port), maxsize=threads)

    def head(tag: str) -> None:
        response = pool.request("HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
        assert response.status == 200 and response.headers["Docker-Content-Digest"]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as executor:
        list(executor.map(head, tags))
    elapsed = time.perf_counter() - started
    pool.close()
    return elapsed


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(method, 0)} {method}" for method in ("HEAD", "GET")) + (
        "" if set(counts) <= {"HEAD", "GET"} else f" (+ {counts})"
    )


def _ms(values: list[float], count: int) -> str:
    return f"{statistics.median(values) / count * 1000:.2f} ms"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _floor(cpu: dict[str, list[float]], count: int, cpus: int) -> float:
    """The fastest a check could go: all CPU work (ours and the registry's) spread on every CPU."""
    total = statistics.median(cpu["ours"]) + statistics.median(cpu["ours-registry"])
    return total / cpus / count * 1000


def link_section(
    via: str,
    concurrency: int,
    tags: list[str],
    ours: list[float],
    loop: list[float],
    ceiling: list[float],
    skopeo: tuple[float, int],
    counts: tuple[dict[str, int], dict[str, int], dict[str, int]],
    link: dict[str, list[float]],
    load: tuple[float, float],
    rounds: int,
) -> str:
    """The results through the emulated link: every approach waits a round trip per request."""
    rtt_ms, rate_mbps = parse_link(via)
    n = len(tags)
    ours_s, loop_s, ceiling_s = statistics.median(ours), statistics.median(loop), statistics.median(ceiling)
    skopeo_seconds, sampled = skopeo
    skopeo_total = skopeo_seconds / sampled * n
    vs_skopeo, vs_loop = skopeo_total / ours_s, loop_s / ours_s
    ours_counts, loop_counts, skopeo_counts = counts
    gets = ours_counts.get("GET", 0)
    floor = -(-n // concurrency) * rtt_ms / 1000
    rate = f", {rate_mbps:g} MB/s" if rate_mbps else ""
    return f"""\
### Upgrade check: {n} installed backends, nothing changed (`bench/bench_check.py --via-proxy {via}`)

`python -m bench.bench_check --backends {n} --rounds {rounds} --via-proxy {via}` \
({time.strftime("%Y-%m-%d")}, {os.cpu_count()} CPU(s)): every approach reaches the loopback \
`docker-registry` through `bench.netproxy` (its own process) at {rtt_ms:g} ms round trip{rate} per connection;
concurrency `PORTAL_REGISTRY_CONCURRENCY={concurrency}`; medians of {rounds} alternating rounds after an \
untimed warm-up; load average {load[0]:.1f} before, {load[1]:.1f} after.

| approach | time for {n} tags | per tag | registry saw | ours is |
| --- | ---: | ---: | --- | ---: |
| ours: `detection.find_upgrades()` end to end, a fresh client each round | {ours_s:.2f} s | \
{ours_s / n * 1000:.1f} ms | {_fmt_counts(ours_counts)} | |
| (a) `skopeo inspect` per tag (timed on {sampled} tags, extrapolated) | {skopeo_total:.1f} s | \
{skopeo_seconds / sampled * 1000:.0f} ms | {_fmt_counts(skopeo_counts)} for {sampled} tags | \
**{vs_skopeo:.1f}x** faster (goal {LINK_GOAL_SKOPEO:.0f}x: {_met(vs_skopeo >= LINK_GOAL_SKOPEO)}) |
| (b) sequential HEAD loop, one `requests` session | {loop_s:.2f} s | {loop_s / n * 1000:.1f} ms | \
{_fmt_counts(loop_counts)} | **{vs_loop:.1f}x** faster (goal {LINK_GOAL_HEAD_LOOP:.0f}x: \
{_met(vs_loop >= LINK_GOAL_HEAD_LOOP)}) |
| (c) bare `urllib3` HEADs on {concurrency} threads, one pool | {ceiling_s:.2f} s | \
{ceiling_s / n * 1000:.1f} ms | {n} HEAD | {ceiling_s / ours_s:.2f}x |

Rounds, ours: {", ".join(f"{s:.2f}" for s in ours)} s; HEAD loop: {", ".join(f"{s:.2f}" for s in loop)} s.
Connections ours opened per check: {", ".join(f"{c:.0f}" for c in link["connections"])}; proxy CPU per \
check: {max(link["proxy_cpu"]):.2f} s at most. Zero manifest GETs when nothing changed: {gets} GET, \
{_met(gets == 0)}.

Waiting, not CPU, bounds a check here: with {concurrency} requests in flight and one round trip each, \
{n} HEADs cannot take less than {floor:.2f} s, before the connections' own handshakes; \
a sequential loop pays one round trip per tag ({n * rtt_ms / 1000:.1f} s), `skopeo inspect` a new \
process, connection and several requests per tag.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of ours and of the HEAD loop")
    parser.add_argument("--skopeo-sample", type=int, default=50, help="tags inspected with skopeo")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    parser.add_argument(
        "--via-proxy",
        metavar="RTT_MS[:RATE_MBPS]",
        help="check through bench.netproxy: this round trip (and cap per connection), e.g. 40:25",
    )
    args = parser.parse_args(argv)
    if not shutil.which("skopeo"):
        raise SystemExit("skopeo is missing (apt-get install skopeo)")

    workdir = Path(tempfile.mkdtemp(prefix="bench-check-"))
    server = None
    proxy: ProxyProcess | None = None
    try:
        setup_django(workdir)
        from django.conf import settings

        server = start_registry(workdir)
        log = RegistryCounts(server.metrics_url)
        print(f"pushing {args.backends} tags to {server.host} ...", flush=True)
        repo, tagged = push_tags(server, args.backends)
        host = server.host
        if args.via_proxy:
            rtt_ms, rate_mbps = parse_link(args.via_proxy)
            proxy = ProxyProcess(server.host, rtt_ms, rate_mbps).start()
            host = proxy.host
            print(f"through the link {args.via_proxy} on {host}", flush=True)
        record_installed(host, repo, tagged)
        tags = [tag for tag, _ in tagged]

        # Warm-up, untimed: the first check records every tag's digest (a steady-state periodic
        # check only stamps the time), and both sides get their imports and first connection.
        run_ours()
        run_head_loop(host, repo, tags[:10])
        ours, loop, ceiling = [], [], []
        ours_counts: dict[str, int] = {}
        loop_counts: dict[str, int] = {}
        cpu: dict[str, list[float]] = {
            "ours": [],
            "ours-registry": [],
            "loop": [],
            "loop-registry": [],
            "ceiling": [],
        }
        registry_pid = server._process.pid
        load_before = os.getloadavg()[0]
        link: dict[str, list[float]] = {"connections": [], "proxy_cpu": []}
        for round_number in range(args.rounds):  # alternate, so drift hits both alike
            log.mark()
            mine, theirs = time.process_time(), process_cpu(registry_pid)
            link_before = (proxy.stats()["connections"], proxy.cpu_seconds()) if proxy else (0, 0.0)
            seconds, report = run_ours()
            cpu["ours"].append(time.process_time() - mine)
            cpu["ours-registry"].append(process_cpu(registry_pid) - theirs)
            if proxy is not None:
                link["connections"].append(proxy.stats()["connections"] - link_before[0])
                link["proxy_cpu"].append(proxy.cpu_seconds() - link_before[1])
            counts = log.counts()
            if report.upgrades or report.errors or len(report.results) != args.backends:
                raise SystemExit(f"unexpected check result: {report.summary()}")
            ours.append(seconds)
            ours_counts = counts
            log.mark()
            mine, theirs = time.process_time(), process_cpu(registry_pid)
            loop.append(run_head_loop(host, repo, tags))
            cpu["loop"].append(time.process_time() - mine)
            cpu["loop-registry"].append(process_cpu(registry_pid) - theirs)
            loop_counts = log.counts()
            mine = time.process_time()
            ceiling.append(run_ceiling(host, repo, tags, settings.PORTAL_REGISTRY_CONCURRENCY))
            cpu["ceiling"].append(time.process_time() - mine)
            print(
                f"round {round_number + 1}: ours {seconds:.3f}s, HEAD loop {loop[-1]:.3f}s, "
                f"registry ceiling {ceiling[-1]:.3f}s",
                flush=True,
            )

        sample = tags[:: max(1, len(tags) // args.skopeo_sample)][: args.skopeo_sample]
        log.mark()
        skopeo_seconds = run_skopeo(host, repo, sample)
        skopeo_counts = log.counts()
        load_after = os.getloadavg()[0]
        skopeo_total = skopeo_seconds / len(sample) * len(tags)

        ours_s, loop_s = statistics.median(ours), statistics.median(loop)
        ceiling_s = statistics.median(ceiling)
        vs_skopeo, vs_loop = skopeo_total / ours_s, loop_s / ours_s
        per_tag_requests = {k: v / len(sample) for k, v in skopeo_counts.items()}
        cpu_count = os.cpu_count() or 1
        gets = ours_counts.get("GET", 0)
        section = f"""\
## Upgrade check: {len(tags)} installed backends, nothing changed (`bench/bench_check.py`)

Measured {time.strftime("%Y-%m-%d")} on {cpu_count} CPU(s), {platform.python_implementation()} \
{platform.python_version()}, against a local `docker-registry` (one repository, {len(tags)} tags);
concurrency `PORTAL_REGISTRY_CONCURRENCY={settings.PORTAL_REGISTRY_CONCURRENCY}`; medians of \
{args.rounds} alternating rounds after an untimed warm-up check; 1-minute load average \
{load_before:.1f} before, {load_after:.1f} after (other work on the machine slows both sides).
Request counts are the registry's own (its Prometheus request counters, access log off).
Ours is timed end to end: installed rows read,
registry lookups on the thread pool, verdicts written (the gallery sync a check starts with is
left out: it is one conditional GET of the gallery index, not a registry request).

| approach | time for {len(tags)} tags | per tag | registry saw | ours is |
| --- | ---: | ---: | --- | ---: |
| ours: `detection.find_upgrades()` end to end (DB read, lookups, DB write) | {ours_s:.3f} s | \
{ours_s / len(tags) * 1000:.2f} ms | {_fmt_counts(ours_counts)} | |
| (a) `skopeo inspect` per tag (timed on {len(sample)} tags, extrapolated) | {skopeo_total:.1f} s | \
{skopeo_seconds / len(sample) * 1000:.1f} ms | {_fmt_counts(skopeo_counts)} for {len(sample)} tags \
({", ".join(f"{v:g} {k}" for k, v in sorted(per_tag_requests.items()))} a tag) | **{vs_skopeo:.0f}x** faster \
(goal {GOAL_SKOPEO:.0f}x) |
| (b) sequential HEAD loop, one `requests` session | {loop_s:.3f} s | {loop_s / len(tags) * 1000:.2f} ms | \
{_fmt_counts(loop_counts)} | **{vs_loop:.1f}x** faster (goal {GOAL_HEAD_LOOP:.0f}x) |
| (c) the registry's ceiling: bare `urllib3` HEADs on {settings.PORTAL_REGISTRY_CONCURRENCY} threads \
(no auth, retries or checks) | {ceiling_s:.3f} s | {ceiling_s / len(tags) * 1000:.2f} ms | \
{len(tags)} HEAD each round | \
{ceiling_s / ours_s:.2f}x (1.0 = as fast as the registry can answer) |

Rounds, ours: {", ".join(f"{s:.3f}" for s in ours)} s; HEAD loop: {", ".join(f"{s:.3f}" for s in loop)} s.

CPU per tag (medians): ours {_ms(cpu["ours"], len(tags))} in our process and \
{_ms(cpu["ours-registry"], len(tags))} in the registry; HEAD loop {_ms(cpu["loop"], len(tags))} and \
{_ms(cpu["loop-registry"], len(tags))}. On {cpu_count} CPU(s), a check cannot finish faster than
(our CPU + the registry's CPU) / CPUs per tag, about {_floor(cpu, len(tags), cpu_count):.2f} ms here.
The best any client could do against this registry here is (b) / (c) = **{loop_s / ceiling_s:.1f}x** \
the HEAD loop.

Goals: {GOAL_SKOPEO:.0f}x faster than skopeo: {vs_skopeo:.0f}x, {_met(vs_skopeo >= GOAL_SKOPEO)}; \
{GOAL_HEAD_LOOP:.0f}x faster than the HEAD loop: {vs_loop:.1f}x, {_met(vs_loop >= GOAL_HEAD_LOOP)}; \
zero manifest GETs when nothing changed: {gets} GET, {_met(gets == 0)}.
Ours is bound by CPU, not by waiting: per tag our process spends {_ms(cpu["ours"], len(tags))} (most \
of it in the registry client's `requests` calls) and the registry {_ms(cpu["ours-registry"], len(tags))}, \
on {cpu_count} CPU(s) shared with each other; bare `urllib3` spends {_ms(cpu["ceiling"], len(tags))} a HEAD.
"""
        if args.via_proxy:
            record_goal(
                "upgrade check through the link: ours vs skopeo inspect",
                vs_skopeo,
                f">= {LINK_GOAL_SKOPEO:.0f}x",
                vs_skopeo >= LINK_GOAL_SKOPEO,
                "x",
            )
            record_goal(
                "upgrade check through the link: ours vs a HEAD loop",
                vs_loop,
                f">= {LINK_GOAL_HEAD_LOOP:.0f}x",
                vs_loop >= LINK_GOAL_HEAD_LOOP,
                "x",
            )
            record_goal(
                "upgrade check through the link: manifest GETs when nothing changed",
                gets,
                "0 GET",
                gets == 0,
                " GET",
            )
            section = link_section(
                args.via_proxy,
                settings.PORTAL_REGISTRY_CONCURRENCY,
                tags,
                ours,
                loop,
                ceiling,
                (skopeo_seconds, len(sample)),
                (ours_counts, loop_counts, skopeo_counts),
                link,
                (load_before, load_after),
                args.rounds,
            )
        else:
            record_goal(
                "upgrade check on loopback: ours vs skopeo inspect",
                vs_skopeo,
                f">= {GOAL_SKOPEO:.0f}x",
                vs_skopeo >= GOAL_SKOPEO,
                "x",
            )
            record_goal(
                "upgrade check on loopback: ours vs a HEAD loop",
                vs_loop,
                f">= {GOAL_HEAD_LOOP:.0f}x",
                vs_loop >= GOAL_HEAD_LOOP,
                "x",
            )
            record_goal(
                "upgrade check on loopback: manifest GETs when nothing changed",
                gets,
                "0 GET",
                gets == 0,
                " GET",
            )
        print(section)
        if not args.no_docs:
            begin, end = (LINK_BEGIN, LINK_END) if args.via_proxy else (BEGIN, END)
            write_section(begin, end, section)
        return 0
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
