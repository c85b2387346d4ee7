"""HTTP 429 slows a check down instead of failing it, against a real registry behind a proxy that
answers 429 beyond a rate (or to everything)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest
from django.utils import timezone

from backends_app import jobs
from backends_app.models import Backend, Gallery, InstalledVersion, JobKind, JobStatus, Node, UpgradeJob
from backends_app.oci.host_limit import HostLimit
from tests.registry import FaultProxy, RateLimit, RegistryServer

pytestmark = [pytest.mark.registry, pytest.mark.django_db]

AMD64 = "linux/amd64"


def push_tag(registry: RegistryServer, repo: str, tag: str, build: str) -> str:
    registry.push_image({"run.sh": ("#!/bin/sh\necho ok\n", 0o755), "build.txt": build}, repo=repo, tag=tag)
    with registry.client() as client:
        return client.head_digest(registry.ref(repo, tag))


def installed_tags(registry: RegistryServer, host: str, count: int) -> tuple[str, list[str]]:
    """`count` tags of one repository recorded as installed (named through `host`) on one node, as
    an install leaves them; returns (repository, backend names)."""
    repo = registry.unique_repo("limited")
    gallery = Gallery.objects.create(name="limited", url="file:///nonexistent/limited.yaml")
    node = Node.objects.create(name="limited-node", platform=AMD64, backends_path="/nonexistent")
    names = []
    for i in range(count):
        name = f"backend-{i:02d}"
        digest = push_tag(registry, repo, f"build-{name}", f"{name} build 1")
        backend = Backend.objects.create(
            gallery=gallery, name=name, uri=f"{host}/{repo}:build-{name}", position=i
        )
        InstalledVersion.objects.create(
            node=node,
            backend=backend,
            name=name,
            uri=backend.uri,
            digest=digest,
            installed_at=timezone.now(),
            path=f"/nonexistent/{name}",
        )
        names.append(name)
    return repo, names


def test_a_rate_limited_registry_slows_the_check_down_and_every_verdict_stands(
    registry: RegistryServer, fault_proxy_factory: Any, settings: Any
) -> None:
    settings.PORTAL_REGISTRY_CONCURRENCY = 8
    settings.PORTAL_REGISTRY_RETRIES = 1  # a 429 is not a retry: one retry would not get through
    proxy: FaultProxy = fault_proxy_factory(registry.host)
    repo, names = installed_tags(registry, proxy.host, 24)
    moved = set(names[::6])
    for name in moved:
        push_tag(registry, repo, f"build-{name}", f"{name} build 2")
    proxy.log.clear()
    proxy.rate_limit = RateLimit(per_second=10, burst=4, retry_after="2")

    job = UpgradeJob.objects.create(kind=JobKind.CHECK, requested_by="test")
    job = jobs.run(job.pk)  # as a worker runs it, with the client the settings make

    assert job.status == JobStatus.SUCCEEDED, job.message
    log = sorted(proxy.log)
    refused = [at for at, _, _, status in log if status == 429]
    assert refused, "the proxy never refused a request: nothing was tested"
    assert f"registry {proxy.host} rate-limited us (HTTP 429 x {len(refused)}): slowed to " in job.message
    slowed_to = int(job.message.split("slowed to ")[1].split(" ")[0])
    assert 1 <= slowed_to < 8
    for backend in Backend.objects.all():
        assert backend.last_error == ""
        assert backend.upgrade_available is (backend.name in moved), backend.name
    # Every tag answered once (a 429 is answered again, not given up on), and nothing was fetched
    # for the tags that did not move.
    heads = [path for _, method, path, status in log if method == "HEAD" and status == 200]
    assert sorted(heads) == sorted({f"/v2/{repo}/manifests/build-{name}" for name in names})
    # Retry-After: 2 holds for the whole host: once a 429 is out, the other threads wait too. Requests
    # already sent may still land just after it; none is sent again within the two seconds.
    first = refused[0]
    assert not [at for at, *_ in log if first + 0.5 < at < first + 1.9]


def test_a_registry_that_only_answers_429_ends_the_check_with_a_clear_error(
    registry: RegistryServer, fault_proxy_factory: Any, settings: Any
) -> None:
    settings.PORTAL_REGISTRY_CONCURRENCY = 8
    settings.PORTAL_REGISTRY_RATE_LIMIT_PATIENCE = 2
    proxy: FaultProxy = fault_proxy_factory(registry.host)
    _, names = installed_tags(registry, proxy.host, 6)
    Backend.objects.filter(name=names[0]).update(upgrade_available=True, upgrade_reason="from before")
    proxy.rate_limit = RateLimit(per_second=0, burst=0)  # no Retry-After: the client's own backoff

    started = time.monotonic()
    job = UpgradeJob.objects.create(kind=JobKind.CHECK, requested_by="test")
    job = jobs.run(job.pk)
    elapsed = time.monotonic() - started

    assert job.status == JobStatus.FAILED
    assert job.error.startswith("checked 6 backends: 0 upgrades available, 6 errors; ")
    assert f"registry {proxy.host} rate-limited us (HTTP 429 x " in job.error
    assert "slowed to 1 request in flight, then gave up on 6 requests it kept refusing" in job.error
    for backend in Backend.objects.all():
        assert "rate-limited (HTTP 429)" in backend.last_error and "than the 2s allowed" in backend.last_error
    # What could not be checked keeps its last result.
    assert Backend.objects.get(name=names[0]).upgrade_reason == "from before"
    assert {status for *_, status in proxy.log} == {429}
    assert elapsed < 120  # bounded: patience plus one backoff, far below any timeout


def test_requests_in_flight_to_one_host_stay_within_the_limit(
    registry: RegistryServer, fault_proxy_factory: Any
) -> None:
    proxy: FaultProxy = fault_proxy_factory(registry.host)
    repo = registry.unique_repo("inflight")
    tags = [f"t{i}" for i in range(4)]
    for tag in tags:
        push_tag(registry, repo, tag, tag)

    with registry.client(max_in_flight=3) as client, concurrent.futures.ThreadPoolExecutor(12) as pool:
        digests = list(
            pool.map(client.head_digest, [f"{proxy.host}/{repo}:{tags[i % 4]}" for i in range(96)])
        )

    assert len(set(digests)) == 4
    assert proxy.most_in_flight <= 3
    assert client.rate_limits() == {}  # no 429: nothing to report


def test_429s_cut_the_limit_once_per_round_and_answers_grow_it_back() -> None:
    now = [100.0]
    limit = HostLimit("registry.example", 32, backoff=0.5, max_wait=60, clock=lambda: now[0])
    sent = [limit.acquire() for _ in range(32)]
    for at in sent:  # a burst of 429s for requests sent in the same round: one cut
        limit.throttled(at, retry_after=None)
    stats = limit.stats()
    assert (stats.limit, stats.lowest, stats.throttled) == (16, 16, 32)
    now[0] += 1.0  # past the backoff pause
    at = limit.acquire()
    limit.throttled(at, retry_after=3)  # sent after the cut: a new round, a new cut
    assert limit.stats().limit == 8
    now[0] += 3.0
    assert limit.stalled_for() == pytest.approx(4.0)
    answers = 0
    while limit.stats().limit == 8:
        limit.acquire()
        limit.answered()
        answers += 1
    assert limit.stats().limit == 9 and answers in (8, 9)  # one more per `limit` answers
    assert limit.stalled_for() == 0.0
    assert limit.stats().lowest == 8
