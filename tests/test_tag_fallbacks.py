"""LocalAI's tag fallbacks against the real docker-registry: a missing `latest-X` image installs from
`master-X`, then `master-X-development`; metadata.json names the source actually installed, and
the check compares against that same source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from backends_app import detection, sources
from backends_app.models import Backend, InstalledVersion, JobKind, JobStatus, PortalSettings
from tests.conftest import image, run_op
from tests.registry import FaultProxy, RegistryServer

pytestmark = [pytest.mark.registry, pytest.mark.django_db]


def test_the_fallback_tags_follow_localai() -> None:
    assert sources.fallback_uris("quay.io/go-skynet/local-ai-backends:latest-cpu-llama-cpp") == [
        "quay.io/go-skynet/local-ai-backends:master-cpu-llama-cpp",
        "quay.io/go-skynet/local-ai-backends:master-cpu-llama-cpp-development",
    ]
    assert sources.fallback_uris("localhost:5000/x:latest-cpu-x-development") == [
        "localhost:5000/x:master-cpu-x-development"
    ]
    assert sources.fallback_uris("quay.io/x:master-cpu-x") == []  # nothing to fall back to
    assert sources.fallback_uris("quay.io/latest-x/y:v1") == []  # only the tag is looked at
    assert sources.fallback_uris("quay.io/x@sha256:" + "a" * 64) == []
    assert sources.fallback_uris("/srv/latest-cpu-x") == []
    assert sources.fallback_uris("quay.io/x:stable-cpu", "stable", "edge", "dev") == [
        "quay.io/x:edge-cpu",
        "quay.io/x:edge-cpu-dev",
    ]


@pytest.mark.parametrize("pushed", ["master-cpu-demo", "master-cpu-demo-development"])
def test_a_missing_latest_tag_installs_from_its_fallback_and_records_it(
    pushed: str,
    registry: RegistryServer,
    gallery_factory: Any,
    fault_proxy_factory: Any,
    settings: Any,
) -> None:
    repo = registry.unique_repo("fallback")
    registry.push_image(image("v1"), repo=repo, tag=pushed)
    proxy: FaultProxy = fault_proxy_factory(registry.host)
    primary = f"{proxy.host}/{repo}:latest-cpu-demo"
    installed_from = f"{proxy.host}/{repo}:{pushed}"
    gallery_factory([{"name": "cpu-demo", "uri": primary}])

    job = run_op(Backend.objects.lookup("cpu-demo"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.source == installed_from
    live = Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo"
    assert (live / "lib/version.txt").read_text() == "v1"
    metadata = json.loads((live / "metadata.json").read_text())
    assert metadata["uri"] == installed_from  # LocalAI would write the primary here
    with registry.client() as client:
        assert metadata["digest"] == client.head_digest(registry.ref(repo, pushed))
    assert InstalledVersion.objects.get(name="cpu-demo", state="current").uri == installed_from

    proxy.log.clear()
    report = detection.find_upgrades(sync_galleries=False)

    [row] = report.rows
    assert row["upgrade_available"] is False and row["error"] == "" and row["reason"] == ""
    # The source installed from is asked first: one HEAD, none for the missing primary.
    assert [(method, path.rsplit("/", 1)[-1]) for _, method, path, _ in proxy.log] == [("HEAD", pushed)]

    registry.push_image(image("v2"), repo=repo, tag=pushed)
    [row] = detection.find_upgrades(sync_galleries=False).rows
    assert row["upgrade_available"] is True and row["reason"].startswith("new build for")
    upgrade = run_op(Backend.objects.lookup("cpu-demo"), JobKind.UPGRADE)
    assert upgrade.status == JobStatus.SUCCEEDED, upgrade.error
    assert (live / "lib/version.txt").read_text() == "v2" and upgrade.source == installed_from


def test_every_source_failing_names_each_one(registry: RegistryServer, gallery_factory: Any) -> None:
    repo = registry.unique_repo("nothing")
    primary = registry.ref(repo, "latest-cpu-none")
    gallery_factory([{"name": "cpu-none", "uri": primary}])

    job = run_op(Backend.objects.lookup("cpu-none"), JobKind.INSTALL)

    assert job.status == JobStatus.FAILED
    for tag in ("latest-cpu-none", "master-cpu-none", "master-cpu-none-development"):
        assert f"{registry.ref(repo, tag)}:" in job.error


def test_the_development_build_follows_localai() -> None:
    assert (
        sources.development_uri("quay.io/go-skynet/local-ai-backends:latest-cpu-llama-cpp")
        == "quay.io/go-skynet/local-ai-backends:master-cpu-llama-cpp"
    )
    assert sources.development_uri("quay.io/x:master-cpu-x") is None  # a branch build already
    assert sources.development_uri("quay.io/x:v1.2") is None  # no release tag
    assert sources.development_uri("quay.io/latest-x/y:v1") is None  # only the tag is looked at
    assert sources.development_uri("quay.io/x@sha256:" + "a" * 64) is None
    assert sources.development_uri("/srv/latest-cpu-x") is None
    assert sources.development_uri("quay.io/x:stable-cpu", "stable", "edge") == "quay.io/x:edge-cpu"


def test_prefer_development_backends_puts_the_branch_build_first_from_the_file_or_the_environment(
    settings: Any,
) -> None:
    uri, mirror = "quay.io/x/b:latest-cpu-demo", "mirror.example/x/b:latest-cpu-demo"
    released = ["quay.io/x/b:latest-cpu-demo", mirror, "quay.io/x/b:master-cpu-demo"]
    released.append("quay.io/x/b:master-cpu-demo-development")
    assert Backend.chain_for(uri, [mirror]) == released

    path = PortalSettings.runtime_settings_path()
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"prefer_development_backends": true}')
    preferred = Backend.chain_for(uri, [mirror])
    # LocalAI's order: the branch build, then the released image as its first fallback.
    assert preferred == [
        "quay.io/x/b:master-cpu-demo",
        uri,
        mirror,
        "quay.io/x/b:master-cpu-demo-development",
    ]
    assert Backend.chain_for("quay.io/x/b:v1", []) == ["quay.io/x/b:v1"]  # nothing to prefer

    path.write_text('{"prefer_development_backends": false, "debug": true}')
    assert Backend.chain_for(uri, [mirror]) == released
    settings.PORTAL_PREFER_DEV_BACKENDS = True  # LOCALAI_PREFER_DEV_BACKENDS=true: the environment wins
    assert Backend.chain_for(uri, [mirror]) == preferred


def test_with_prefer_development_an_install_takes_the_branch_build_and_the_check_follows_it(
    registry: RegistryServer, gallery_factory: Any, settings: Any
) -> None:
    repo = registry.unique_repo("prefer-dev")
    registry.push_image(image("released"), repo=repo, tag="latest-cpu-demo")
    registry.push_image(image("branch"), repo=repo, tag="master-cpu-demo")
    gallery_factory([{"name": "cpu-demo", "uri": registry.ref(repo, "latest-cpu-demo")}])
    settings.PORTAL_PREFER_DEV_BACKENDS = True

    job = run_op(Backend.objects.lookup("cpu-demo"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    branch = registry.ref(repo, "master-cpu-demo")
    assert job.source == branch
    live = Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo"
    assert (live / "lib/version.txt").read_text() == "branch"
    assert json.loads((live / "metadata.json").read_text())["uri"] == branch
    [row] = detection.find_upgrades(sync_galleries=False).rows
    assert row["upgrade_available"] is False and row["error"] == "", row

    registry.push_image(image("branch-2"), repo=repo, tag="master-cpu-demo")
    [row] = detection.find_upgrades(sync_galleries=False).rows
    assert row["upgrade_available"] is True, row
