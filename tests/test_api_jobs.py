"""The jobs endpoints: the list, one job with its progress and outcome, and cancelling."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.utils import timezone

from backends_app.models import JobKind, JobPhase, JobStatus, Node, UpgradeJob
from tests.helpers.api import OPERATE, client_for, make_backend, make_gallery, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> Any:
    return client_for(make_user("ops", perms=(OPERATE,)))


@pytest.fixture
def jobs() -> dict[str, UpgradeJob]:
    gallery = make_gallery("main")
    node = Node.local()
    piper, bark = make_backend(gallery, "piper"), make_backend(gallery, "bark")
    started = timezone.now() - dt.timedelta(seconds=90)
    return {
        "done": UpgradeJob.objects.create(
            kind=JobKind.UPGRADE,
            backend=piper,
            node=node,
            status=JobStatus.SUCCEEDED,
            phase=JobPhase.DONE,
            from_version="1.0",
            to_version="1.1",
            to_digest="sha256:" + "c" * 64,
            source="quay.io/x/piper:1.1",
            started_at=started,
            finished_at=started + dt.timedelta(seconds=42.5),
            percent=100,
            bytes_done=1000,
            bytes_total=1000,
        ),
        "failed": UpgradeJob.objects.create(
            kind=JobKind.INSTALL, backend=bark, node=node, status=JobStatus.FAILED, error="registry said 404"
        ),
        "queued": UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=bark, node=node),
        "check": UpgradeJob.objects.create(kind=JobKind.CHECK, status=JobStatus.RUNNING, started_at=started),
    }


def ids(response: Any) -> list[int]:
    return [row["id"] for row in response.json()["results"]]


def test_jobs_are_listed_newest_first(api: Any, jobs: dict[str, UpgradeJob]) -> None:
    assert ids(api.get("/api/v1/jobs/")) == [jobs[k].pk for k in ("check", "queued", "failed", "done")]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=failed", ["failed"]),
        ("status=active", ["check", "queued"]),
        ("status=finished", ["failed", "done"]),
        ("kind=upgrade", ["queued", "done"]),
        ("backend=bark", ["queued", "failed"]),
        ("backend=main@piper", ["done"]),
        ("backend=other@piper", []),
        ("kind=upgrade&status=queued&backend=bark", ["queued"]),
    ],
)
def test_jobs_filter_by_status_kind_and_backend(
    api: Any, jobs: dict[str, UpgradeJob], query: str, expected: list[str]
) -> None:
    assert ids(api.get(f"/api/v1/jobs/?{query}")) == [jobs[k].pk for k in expected]


@pytest.mark.parametrize("query", ["status=exploded", "kind=reboot", "page_size=-1"])
def test_a_malformed_job_filter_is_a_400(api: Any, jobs: dict[str, UpgradeJob], query: str) -> None:
    response = api.get(f"/api/v1/jobs/?{query}")

    assert response.status_code == 400 and query.split("=")[0] in response.json()


def test_a_job_shows_its_progress_outcome_and_timing(api: Any, jobs: dict[str, UpgradeJob]) -> None:
    parent = jobs["check"]
    UpgradeJob.objects.filter(pk=jobs["done"].pk).update(parent=parent)

    done = api.get(f"/api/v1/jobs/{jobs['done'].pk}/").json()
    check = api.get(f"/api/v1/jobs/{parent.pk}/").json()

    assert done["kind"] == "upgrade" and done["status"] == "succeeded" and done["phase"] == "done"
    assert done["backend"] == "piper" and done["gallery"] == "main" and done["node"] == "test-node"
    assert (done["from_version"], done["to_version"]) == ("1.0", "1.1")
    assert done["to_digest"] == "sha256:" + "c" * 64 and done["source"] == "quay.io/x/piper:1.1"
    assert done["percent"] == 100 and done["bytes_done"] == done["bytes_total"] == 1000
    assert done["duration_seconds"] == 42.5 and done["parent"] == parent.pk
    assert check["backend"] is None and check["node"] is None and check["children"] == [jobs["done"].pk]
    assert check["duration_seconds"] >= 90 and check["finished_at"] is None


@pytest.mark.parametrize("job_id", ["abc", "1.5", "-1", "0", "99999999", "9" * 40, "%00", "١٢"])
def test_a_job_id_that_names_no_job_is_a_404(api: Any, jobs: dict[str, UpgradeJob], job_id: str) -> None:
    assert api.get(f"/api/v1/jobs/{job_id}/").status_code == 404
    assert api.post(f"/api/v1/jobs/{job_id}/cancel/").status_code == 404


def test_cancelling_a_queued_job_cancels_it_at_once(api: Any, jobs: dict[str, UpgradeJob]) -> None:
    response = api.post(f"/api/v1/jobs/{jobs['queued'].pk}/cancel/")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and "api:ops" in response.json()["message"]
    assert UpgradeJob.objects.get(pk=jobs["queued"].pk).status == JobStatus.CANCELLED


def test_cancelling_a_running_job_asks_it_to_stop(api: Any, jobs: dict[str, UpgradeJob]) -> None:
    response = api.post(f"/api/v1/jobs/{jobs['check'].pk}/cancel/")

    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    assert UpgradeJob.objects.get(pk=jobs["check"].pk).cancel_requested


@pytest.mark.parametrize("which", ["done", "failed"])
def test_cancelling_a_finished_job_is_a_409(api: Any, jobs: dict[str, UpgradeJob], which: str) -> None:
    response = api.post(f"/api/v1/jobs/{jobs[which].pk}/cancel/")

    assert response.status_code == 409
    assert response.json()["code"] == "finished" and response.json()["job"]["id"] == jobs[which].pk
    assert UpgradeJob.objects.get(pk=jobs[which].pk).status == jobs[which].status
