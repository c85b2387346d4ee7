"""The pages tell the truth: the state they show is `Backend.status` (as the API says it), a rollback
only ever goes back, the last check is the last one whoever asked, a fresh install is known to be
current, and a tag rebuilt under the same version is said so. Real registry, real procedure."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from django.utils import timezone
from django_q.conf import Conf

from backends_app import detection
from backends_app.models import (
    Backend,
    BackendState,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)
from tests.conftest import image, live_version, run_op
from tests.test_admin_actions import install_row

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]


def row_of(page: str, name: str) -> str:
    match = re.search(rf'<tr [^>]*data-backend="{re.escape(name)}".*?</tr>', page, re.S)
    assert match, f"no row for {name}"
    return match.group(0)


def visible_text(html: str) -> str:
    """What a reader sees: tags and attribute values (titles, tooltips) gone."""
    return " ".join(re.sub(r"<[^>]*>", " ", html).split())


@pytest.fixture
def versioned(registry: Any, gallery_factory: Any) -> Any:
    """`cpu-demo`, its tag in the real registry; `.push("v2")` moves the tag to an image labelled v2."""

    class Versioned:
        repo = registry.unique_repo()
        ref = registry.ref(repo, "latest")

        def push(self, version: str, files: dict[str, Any] | None = None) -> str:
            registry.push_image(files or image(version), repo=self.repo, tag="latest", version=version)
            with registry.client() as client:
                return client.head_digest(self.ref)

    demo = Versioned()
    demo.push("v1")
    gallery_factory([{"name": "cpu-demo", "uri": demo.ref}])
    demo.backend = Backend.objects.lookup("cpu-demo")
    return demo


def check() -> detection.CheckReport:
    return detection.find_upgrades(requested_by="test")


# --- the state shown is the one status --------------------------------------------------------------


def test_a_rolled_back_pinned_backend_shows_held_and_pinned_with_the_reason_and_no_forward_rollback(
    versioned: Any, admin_client: Any, settings: Any
) -> None:
    backend = versioned.backend
    assert run_op(backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    versioned.push("v2")
    assert run_op(backend, JobKind.UPGRADE).status == JobStatus.SUCCEEDED
    rollback = run_op(backend, JobKind.ROLLBACK)
    assert rollback.status == JobStatus.SUCCEEDED, rollback.error
    assert live_version(settings, "cpu-demo") == "v1"
    backend.pin()
    check()  # the registry still offers v2, the held build

    page = admin_client.get("/").content.decode()
    row = row_of(page, "cpu-demo")
    text = visible_text(row)
    assert "Held" in text and "pinned" in text
    assert f"v2: rolled back by job {rollback.pk}" in text  # the reason is on the page, not in a tooltip
    assert "Up to date" not in text
    assert 'data-action="rollback"' not in row  # the only kept version (v2) is newer: no "rollback"
    api = admin_client.get("/api/v1/backends/cpu-demo/").json()["status"]
    assert api["state"] == BackendState.HELD and api["detail"] == f"v2: rolled back by job {rollback.pk}"

    # Asked anyway, a rollback is refused: it would go forward.
    refused = admin_client.post("/api/v1/backends/cpu-demo/rollback/", {}, content_type="application/json")
    assert refused.status_code == 409, refused.content
    assert "older than the live one" in refused.json()["detail"]
    assert live_version(settings, "cpu-demo") == "v1"


def test_rollback_names_its_target_and_goes_back_past_a_newer_kept_version(
    versioned: Any, admin_client: Any, settings: Any
) -> None:
    PortalSettings.objects.update(versions_kept=2)
    backend = versioned.backend
    assert run_op(backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    for version in ("v2", "v3"):
        versioned.push(version)
        assert run_op(backend, JobKind.UPGRADE).status == JobStatus.SUCCEEDED
    row = row_of(admin_client.get("/").content.decode(), "cpu-demo")
    assert ">Roll back to v2</button>" in row

    assert run_op(backend, JobKind.ROLLBACK).status == JobStatus.SUCCEEDED
    assert live_version(settings, "cpu-demo") == "v2"
    kept = sorted(
        InstalledVersion.objects.filter(name="cpu-demo", state="kept").values_list("version", flat=True)
    )
    assert kept == ["v1", "v3"]
    row = row_of(admin_client.get("/").content.decode(), "cpu-demo")
    assert ">Roll back to v1</button>" in row and "Roll back to v3" not in row
    assert ">Install held v3</button>" in row  # what the registry offers is the held v3

    again = run_op(backend, JobKind.ROLLBACK)  # back, to v1: never forward to the newer v3
    assert again.status == JobStatus.SUCCEEDED, again.error
    assert live_version(settings, "cpu-demo") == "v1"
    assert again.to_version == "v1"


# --- the last check, whoever asked ----------------------------------------------------------------


def test_a_check_asked_for_on_the_page_is_the_last_check_on_both_pages(
    versioned: Any,
    admin_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    monkeypatch.setattr(Conf, "SYNC", True)  # the worker runs it inline
    assert run_op(versioned.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    assert 'id="last-check">never' in admin_client.get("/settings/").content.decode()

    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post("/check/")
    job = UpgradeJob.objects.get(kind=JobKind.CHECK)
    assert job.status == JobStatus.SUCCEEDED, job.error

    for url in ("/", "/settings/"):
        last = re.search(
            r'id="last-check">(.*?)</(?:span|dd)>\s', admin_client.get(url).content.decode(), re.S
        )
        assert last, url
        assert "by web:admin" in last.group(1) and "never" not in last.group(1), url
        shown = re.search(r'datetime="([^"]+)"', last.group(1))
        assert shown and dt.datetime.fromisoformat(shown.group(1)) >= before, url


# --- just installed is current --------------------------------------------------------------------


def test_a_backend_just_installed_is_up_to_date_not_unchecked(versioned: Any, admin_client: Any) -> None:
    job = run_op(versioned.backend, JobKind.INSTALL)
    assert job.status == JobStatus.SUCCEEDED

    backend = Backend.objects.get(pk=versioned.backend.pk)
    assert (backend.latest_digest, backend.available_version) == (job.to_digest, "v1")
    assert backend.last_checked_at is not None and not backend.upgrade_available
    row = visible_text(row_of(admin_client.get("/").content.decode(), "cpu-demo"))
    assert "Up to date" in row and "not checked" not in row.lower()
    assert admin_client.get("/api/v1/backends/cpu-demo/").json()["status"]["state"] == BackendState.UP_TO_DATE
    # ...and the next check agrees: nothing to upgrade, one HEAD.
    report = check()
    assert [r.upgrade_available for r in report.results] == [False]


def test_an_upgrade_on_one_node_leaves_the_lagging_node_flagged(versioned: Any) -> None:
    backend = versioned.backend
    assert run_op(backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    other = Node.objects.create(name="gpu-box", backends_path="/srv/other")
    install_row(backend, "v0", node=other, digest="sha256:" + "0" * 64)
    Backend.objects.filter(pk=backend.pk).update(
        upgrade_available=True, available_version="v2", upgrade_reason="version v1 -> v2"
    )
    versioned.push("v2")

    assert run_op(backend, JobKind.UPGRADE, node=Node.local()).status == JobStatus.SUCCEEDED

    backend = Backend.objects.with_installations().get(pk=backend.pk)
    assert backend.upgrade_available  # gpu-box still runs v0: nothing says it is current
    assert backend.status.state == BackendState.UPGRADE_AVAILABLE


# --- a tag rebuilt under the same version -----------------------------------------------------------


def test_a_tag_rebuilt_under_the_same_version_is_said_on_the_page_and_in_the_api(
    registry: Any, gallery_factory: Any, admin_client: Any
) -> None:
    repo = registry.unique_repo()
    ref = registry.ref(repo, "latest")
    registry.push_image(image("1.0"), repo=repo, tag="latest")
    gallery_factory([{"name": "cpu-demo", "uri": ref, "version": "1.0"}])
    backend = Backend.objects.lookup("cpu-demo")
    assert run_op(backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    registry.push_image(image("1.0", extra={"lib/fix.txt": "rebuilt"}), repo=repo, tag="latest")

    report = check()

    assert [r.upgrade_available for r in report.results] == [False]  # same version: no upgrade
    status = admin_client.get("/api/v1/backends/cpu-demo/").json()["status"]
    assert status["state"] == BackendState.UP_TO_DATE
    assert status["detail"].startswith("rebuilt in the registry: new digest sha256:")
    row = visible_text(row_of(admin_client.get("/").content.decode(), "cpu-demo"))
    assert "Up to date" in row and "rebuilt in the registry: new digest" in row
