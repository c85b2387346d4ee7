"""Upgrade detection against a real registry: what is flagged, why, and what it costs the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from backends_app import detection, jobs, oci
from backends_app.models import (
    Backend,
    Gallery,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    UpgradeJob,
)
from tests.registry import Fault, FaultProxy, RegistryServer

pytestmark = [pytest.mark.registry, pytest.mark.django_db]

AMD64 = "linux/amd64"
RUN_SH = ("#!/bin/sh\necho ok\n", 0o755)


def files(build: str) -> dict[str, Any]:
    """A minimal backend tree; `build` makes each build's image different."""
    return {"run.sh": RUN_SH, "build.txt": build}


class GalleryIndex:
    """Our own gallery YAML file (file:// URL), synced into a Gallery row as users do."""

    def __init__(self, path: Path, name: str = "test") -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.gallery = Gallery.objects.create(name=name, url=path.as_uri())

    def put(self, name: str, uri: str, **fields: Any) -> None:
        self.entries[name] = {"name": name, "uri": uri, **fields}
        self.path.write_text(yaml.safe_dump(list(self.entries.values()), sort_keys=False))

    def sync(self) -> None:
        result = self.gallery.sync()
        assert result.ok, result.error


@pytest.fixture
def index(tmp_path: Path, settings: Any) -> GalleryIndex:
    settings.PORTAL_PLATFORM = AMD64  # the local node's platform, whatever this machine is
    return GalleryIndex(tmp_path / "index.yaml")


def install(name: str) -> InstalledVersion:
    """Install through the real procedure, as `manage.py backends install` does."""
    backend = Backend.objects.lookup(name)
    job, _ = backend.request(JobKind.INSTALL, queue=False)
    job = jobs.run(job.pk)
    assert job.status == JobStatus.SUCCEEDED, job.error
    return InstalledVersion.objects.get(node=Node.local(), name=name, state=InstalledVersion.State.CURRENT)


def push(registry: RegistryServer, ref: str, build: str) -> str:
    """Push a single-platform (linux/amd64) image to `ref`'s repository and tag in the registry
    (`ref` may name a proxy in front of it); returns the image's digest."""
    parsed = oci.parse_reference(ref)
    registry.push_image(files(build), repo=parsed.repository, tag=parsed.tag or "latest", platforms=[AMD64])
    with registry.client() as client:
        return client.head_digest(registry.ref(parsed.repository, parsed.tag or "latest"))


def installed_backend(
    registry: RegistryServer, index: GalleryIndex, name: str, *, host: str = "", **fields: Any
) -> tuple[str, InstalledVersion]:
    """A backend pushed, listed in the gallery (its uri on `host`, default the registry's) and
    installed; returns (its reference, its installed row)."""
    ref = f"{host or registry.host}/{registry.unique_repo(name)}:latest"
    push(registry, ref, f"{name} build 1")
    index.put(name, ref, **fields)
    index.sync()
    return ref, install(name)


def row(report: detection.CheckReport, name: str, node: str = "test-node") -> dict[str, Any]:
    [found] = [r for r in report.rows if r["name"] == name and r["node"] == node]
    return found


# --- deciding -------------------------------------------------------------------------------------


def test_versions_are_ordered_not_compared_as_text() -> None:
    compare = detection.compare_versions
    assert compare("1.2.0", "1.10.0") == 1  # as text "1.10.0" < "1.2.0"
    assert compare("v2.0.0", "1.9.9") == -1
    assert compare("1.2.0", "v1.2.0") == 0
    assert compare("1.0.0-rc1", "1.0.0") == 1
    assert compare("1.0.0-alpha.beta", "1.0.0-alpha.1") == -1  # semver only: numeric < alphanumeric
    assert compare("1.0.0-alpha.beta", "1.0.0") == 1
    assert compare("master-abc", "master-def") == 1  # neither parses: plain inequality
    assert compare("master-abc", "master-abc") == 0
    assert compare("1.2.0", "master-abc") is None  # one parses: the digest decides


def test_unchanged_backends_cost_one_head_per_distinct_tag_and_no_get(
    registry: RegistryServer, index: GalleryIndex, fault_proxy_factory: Any
) -> None:
    proxy: FaultProxy = fault_proxy_factory(registry.host)
    shared, _ = installed_backend(registry, index, "alpha", host=proxy.host)
    index.put("beta", shared)  # a second gallery entry on the same tag
    index.sync()
    install("beta")
    installed_backend(registry, index, "gamma", host=proxy.host)
    # The same backends on a second node: still one HEAD per tag.
    other = Node.objects.create(name="node-b", platform=AMD64, backends_path="/nonexistent")
    for installed in InstalledVersion.objects.filter(node=Node.local()):
        InstalledVersion.objects.create(
            node=other,
            backend=installed.backend,
            name=installed.name,
            version=installed.version,
            uri=installed.uri,
            digest=installed.digest,
            path=f"/nonexistent/{installed.name}",
        )
    proxy.log.clear()

    with registry.client() as client:
        report = detection.find_upgrades(client=client)
        counts = client.request_counts

    assert len(report.results) == 6
    assert not report.upgrades and not report.errors
    assert {r["reason"] for r in report.rows} == {""}
    assert counts == {"HEAD": 2}
    seen = [(method, status) for _, method, _, status in proxy.log]
    assert seen == [("HEAD", 200), ("HEAD", 200)]  # what the registry saw
    assert report.summary() == "checked 6 backends on 2 nodes: 0 upgrades available, 0 errors"
    for backend in Backend.objects.filter(name__in=["alpha", "beta", "gamma"]):
        assert backend.last_checked_at is not None
        assert not backend.upgrade_available and backend.upgrade_reason == "" and backend.last_error == ""
        assert backend.latest_digest == InstalledVersion.objects.filter(backend=backend).first().digest


def test_a_new_push_to_the_tag_is_flagged_with_its_reason(
    registry: RegistryServer, index: GalleryIndex, portal_paths: Path
) -> None:
    ref, installed = installed_backend(registry, index, "alpha")
    run_sh = (Path(installed.path) / "run.sh").read_bytes()
    new_digest = push(registry, ref, "alpha build 2")

    with registry.client() as client:
        report = detection.find_upgrades(client=client)
        counts = client.request_counts

    result = row(report, "alpha")
    old = installed.digest.removeprefix("sha256:")[:12]
    new = new_digest.removeprefix("sha256:")[:12]
    assert result["upgrade_available"] is True
    assert result["reason"] == f"new build for linux/amd64: sha256:{old}.. -> sha256:{new}.."
    assert result["available_digest"] == new_digest and result["installed_digest"] == installed.digest
    assert counts == {"HEAD": 1, "GET": 2}  # the tag's HEAD, then both manifests by digest
    backend = Backend.objects.get(name="alpha")
    assert backend.upgrade_available and backend.upgrade_reason == result["reason"]
    assert backend.latest_digest == new_digest
    # A check changes nothing installed.
    installed.refresh_from_db()
    assert installed.digest != new_digest
    assert (Path(installed.path) / "run.sh").read_bytes() == run_sh
    assert not UpgradeJob.objects.filter(kind=JobKind.UPGRADE).exists()


def test_a_rebuild_for_another_platform_only_is_not_flagged(
    registry: RegistryServer, index: GalleryIndex
) -> None:
    repo = registry.unique_repo("multi")
    ref = registry.push_platforms({AMD64: files("amd64 1"), "linux/arm64": files("arm64 1")}, repo=repo)
    index.put("multi", ref)
    index.sync()
    installed = install("multi")
    with registry.client() as client:
        assert installed.digest == client.head_digest(ref)  # the index digest was recorded

    registry.push_platforms({AMD64: files("amd64 1"), "linux/arm64": files("arm64 2")}, repo=repo)
    with registry.client() as client:
        report = detection.find_upgrades(client=client)
    result = row(report, "multi")
    assert result["upgrade_available"] is False and result["reason"] == ""
    assert "linux/amd64 image is unchanged" in result["note"]
    assert result["available_digest"] != installed.digest  # the index did move
    assert not Backend.objects.get(name="multi").upgrade_available

    registry.push_platforms({AMD64: files("amd64 2"), "linux/arm64": files("arm64 2")}, repo=repo)
    with registry.client() as client:
        report = detection.find_upgrades(client=client)
    result = row(report, "multi")
    assert result["upgrade_available"] is True
    assert result["reason"].startswith("new build for linux/amd64: sha256:")


def test_declared_versions_are_compared_in_order(registry: RegistryServer, index: GalleryIndex) -> None:
    ref, installed = installed_backend(registry, index, "versioned", version="1.2.0")
    assert installed.version == "1.2.0"
    push(registry, ref, "versioned build 2")

    index.put("versioned", ref, version="1.1.0")  # a lower version is never an upgrade
    with registry.client() as client:
        report = detection.find_upgrades(client=client)
    result = row(report, "versioned")
    assert result["upgrade_available"] is False and result["reason"] == ""
    assert result["note"] == "gallery version 1.1.0 is lower than installed 1.2.0: not an upgrade"
    assert Backend.objects.get(name="versioned").available_version == "1.1.0"

    index.put("versioned", ref, version="v1.10.0")
    with registry.client() as client:
        report = detection.find_upgrades(client=client)
        counts = client.request_counts
    result = row(report, "versioned")
    assert result["upgrade_available"] is True
    assert result["reason"] == "version 1.2.0 -> v1.10.0"
    assert result["available_version"] == "v1.10.0"
    assert counts == {"HEAD": 1}  # the versions decided: no manifest fetched


def test_a_registry_answering_429_is_waited_for_not_hammered(
    registry: RegistryServer, index: GalleryIndex, fault_proxy_factory: Any
) -> None:
    proxy: FaultProxy = fault_proxy_factory(registry.host)
    installed_backend(registry, index, "limited", host=proxy.host)
    proxy.log.clear()
    proxy.add(
        Fault(match=lambda method, path: method == "HEAD", status=429, headers={"Retry-After": "1"}, times=1)
    )

    with registry.client(retries=3, max_retry_wait=5.0) as client:
        report = detection.find_upgrades(client=client)

    heads = [(at, status) for at, method, _, status in proxy.log if method == "HEAD"]
    assert [status for _, status in heads] == [429, 200]
    assert heads[1][0] - heads[0][0] >= 0.95  # Retry-After: 1 honoured
    result = row(report, "limited")
    assert result["error"] == "" and result["upgrade_available"] is False


def test_one_failing_backend_does_not_stop_the_others(
    registry: RegistryServer, index: GalleryIndex, settings: Any
) -> None:
    settings.PORTAL_REGISTRY_RETRIES = 0
    good_ref, _ = installed_backend(registry, index, "good")
    installed_backend(registry, index, "bad")
    push(registry, good_ref, "good build 2")
    Backend.objects.filter(name="bad").update(upgrade_available=True, upgrade_reason="from before")
    index.put("bad", f"{registry.host}/{registry.unique_repo('missing')}:latest")  # unknown repository

    job = UpgradeJob.objects.create(kind=JobKind.CHECK, requested_by="test")
    job = jobs.run(job.pk)  # as a worker runs it

    assert job.status == JobStatus.PARTIAL, list(Backend.objects.values_list("name", "last_error"))
    assert job.message == "checked 2 backends: 1 upgrade available, 1 error"
    assert (job.bytes_done, job.bytes_total) == (2, 2)  # progress counts backends
    good, bad = Backend.objects.get(name="good"), Backend.objects.get(name="bad")
    assert good.upgrade_available and good.last_error == "" and good.last_checked_at
    assert "not found" in bad.last_error
    # What could not be checked keeps its last result.
    assert bad.upgrade_available and bad.upgrade_reason == "from before"


def test_pinned_and_held_targets_are_reported_not_flagged(
    registry: RegistryServer, index: GalleryIndex
) -> None:
    pinned_ref, _ = installed_backend(registry, index, "pinned")
    held_ref, _ = installed_backend(registry, index, "held")
    push(registry, pinned_ref, "pinned build 2")
    bad_digest = push(registry, held_ref, "held build 2")
    Backend.objects.get(name="pinned").pin()
    Backend.objects.get(name="held").hold(version="", digest=bad_digest, reason="health check failed: exit 1")

    with registry.client() as client:
        report = detection.find_upgrades(client=client)

    pinned, held = row(report, "pinned"), row(report, "held")
    assert pinned["upgrade_available"] is False and pinned["pinned"] is True
    assert pinned["reason"].startswith("pinned: new build for linux/amd64: sha256:")
    assert held["upgrade_available"] is False and held["held"] is True
    assert held["reason"] == f"held: {detection.short_digest(bad_digest)} (health check failed: exit 1)"
    assert report.summary() == "checked 2 backends: 0 upgrades available, 1 pinned, 1 held, 0 errors"
    assert not Backend.objects.get_queryset().upgradable().exists()

    fixed = push(registry, held_ref, "held build 3")  # something newer than the held target
    with registry.client() as client:
        report = detection.find_upgrades(client=client)
    held_backend = Backend.objects.get(name="held")
    assert row(report, "held")["upgrade_available"] is True
    assert held_backend.held_digest == "" and held_backend.upgrade_available
    assert held_backend.latest_digest == fixed


def test_a_gallery_that_cannot_be_fetched_keeps_its_last_data(
    registry: RegistryServer, index: GalleryIndex
) -> None:
    ref, _ = installed_backend(registry, index, "alpha")
    push(registry, ref, "alpha build 2")
    index.path.unlink()

    with registry.client() as client:
        report = detection.find_upgrades(client=client)

    assert row(report, "alpha")["upgrade_available"] is True
    assert len(report.gallery_errors) == 1
    assert report.summary().endswith("1 gallery could not be synced (their last good data was used)")
    assert Backend.objects.get(name="alpha").uri == ref


def test_a_check_job_records_progress_and_a_summary(registry: RegistryServer, index: GalleryIndex) -> None:
    for name in ("one", "two", "three"):
        installed_backend(registry, index, name)
    job = UpgradeJob.objects.create(kind=JobKind.CHECK, requested_by="test")
    job = jobs.run(job.pk)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.message == "checked 3 backends: 0 upgrades available, 0 errors"
    assert (job.bytes_done, job.bytes_total, job.percent) == (3, 3, 100.0)
