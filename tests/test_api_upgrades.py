"""The upgrades endpoints: what the check flagged, a new check, and upgrading everything flagged."""

from __future__ import annotations

from typing import Any

import pytest

from backends_app.models import JobKind, JobStatus, Node, UpgradeJob
from tests.helpers.api import (
    OPERATE,
    client_for,
    flag_upgrade,
    install,
    make_backend,
    make_gallery,
    make_user,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> Any:
    return client_for(make_user("ops", perms=(OPERATE,)))


@pytest.fixture
def gallery() -> Any:
    return make_gallery("main")


def test_the_upgrades_list_holds_every_flagged_backend_pinned_ones_included(api: Any, gallery: Any) -> None:
    install(flag_upgrade(make_backend(gallery, "flagged")))
    install(flag_upgrade(make_backend(gallery, "flagged-pinned", pinned=True)))
    install(make_backend(gallery, "current"))

    body = api.get("/api/v1/upgrades/").json()

    assert body["count"] == 2
    rows = {row["name"]: row for row in body["results"]}
    assert rows["flagged"]["available_version"] == "2.0" and rows["flagged"]["upgrade_reason"]
    assert rows["flagged-pinned"]["pinned"] is True


def test_a_check_is_queued_once_a_second_request_gets_409_with_it(api: Any) -> None:
    first = api.post("/api/v1/upgrades/check/")
    second = api.post("/api/v1/upgrades/check/")

    assert first.status_code == 202
    assert first.json()["kind"] == "check" and first.json()["status"] == "queued"
    assert first.json()["requested_by"] == "api:ops"
    assert second.status_code == 409
    assert second.json()["code"] == "active_job" and second.json()["job"]["id"] == first.json()["id"]
    assert UpgradeJob.objects.filter(kind=JobKind.CHECK).count() == 1


def test_a_new_check_can_be_queued_once_the_last_one_finished(api: Any) -> None:
    first = api.post("/api/v1/upgrades/check/").json()
    UpgradeJob.objects.filter(pk=first["id"]).update(status=JobStatus.SUCCEEDED)

    again = api.post("/api/v1/upgrades/check/")

    assert again.status_code == 202 and again.json()["id"] != first["id"]


def test_apply_upgrades_every_flagged_backend_and_says_why_it_skipped_others(api: Any, gallery: Any) -> None:
    install(flag_upgrade(make_backend(gallery, "ready-a")))
    install(flag_upgrade(make_backend(gallery, "ready-b")))
    install(flag_upgrade(make_backend(gallery, "held-back", pinned=True)))
    flag_upgrade(make_backend(gallery, "not-here"))
    busy = install(flag_upgrade(make_backend(gallery, "busy"))).backend
    running = UpgradeJob.objects.create(kind=JobKind.INSTALL, backend=busy, node=Node.local())

    response = api.post("/api/v1/upgrades/apply/", {}, format="json")

    assert response.status_code == 202
    body = response.json()
    assert sorted(job["backend"] for job in body["jobs"]) == ["ready-a", "ready-b"]
    assert all(job["kind"] == "upgrade" and job["requested_by"] == "api:ops" for job in body["jobs"])
    skipped = {row["backend"]: row for row in body["skipped"]}
    # Candidates are the backends installed, flagged and not pinned (`Backend.objects.upgradable()`, as
    # on the pages and the command line): a pinned or uninstalled one is not even a candidate.
    assert set(skipped) == {"main@busy"}
    assert skipped["main@busy"]["job"] == running.pk
    assert not UpgradeJob.objects.filter(backend__name__in=["not-here", "held-back"]).exists()
    assert UpgradeJob.objects.filter(kind=JobKind.UPGRADE).count() == 2


def test_apply_with_nothing_to_do_answers_200_and_queues_nothing(api: Any, gallery: Any) -> None:
    install(make_backend(gallery, "current"))

    response = api.post("/api/v1/upgrades/apply/", {}, format="json")

    assert response.status_code == 200
    assert response.json() == {"jobs": [], "skipped": []}
    assert not UpgradeJob.objects.exists()


def test_apply_to_an_unknown_node_is_a_400(api: Any, gallery: Any) -> None:
    install(flag_upgrade(make_backend(gallery, "ready")))

    response = api.post("/api/v1/upgrades/apply/", {"node": "atlantis"}, format="json")

    assert response.status_code == 400 and "atlantis" in str(response.json()["node"])
    assert not UpgradeJob.objects.exists()
