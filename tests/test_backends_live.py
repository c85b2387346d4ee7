"""The backends page's live updates: `/live/backends/` says what the rows show while jobs run (the
page's script polls it, whatever the channel layer), at a fixed number of queries."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from backends_app.models import Backend, InstalledVersion, JobKind, JobStatus, Node, UpgradeJob
from tests.test_admin_actions import install_row

pytestmark = [pytest.mark.django_db]


@pytest.fixture
def alpha(gallery_factory: Any) -> Backend:
    gallery_factory(
        [
            {"name": "alpha", "uri": "127.0.0.1:9/demo/alpha:latest"},
            {"name": "gamma", "uri": "127.0.0.1:9/demo/gamma:latest"},
        ]
    )
    backend = Backend.objects.get(name="alpha")
    install_row(backend, "v1")
    Backend.objects.filter(pk=backend.pk).update(
        upgrade_available=True,
        available_version="v2",
        upgrade_reason="version v1 -> v2",
        last_checked_at=timezone.now(),
    )
    return backend


def live(client: Any, **params: str) -> dict[str, Any]:
    response = client.get("/live/backends/", params)
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    return response.json()


def test_a_running_upgrade_shows_in_its_row_and_the_row_changes_when_it_ends(
    admin_client: Any, alpha: Backend
) -> None:
    before = live(admin_client)
    (row,) = before["rows"]
    assert (row["name"], row["node"], row["state"], row["job"]) == (
        "alpha",
        "test-node",
        "upgrade_available",
        None,
    )
    assert 'data-action="upgrade"' in row["html"] and before["upgradable"] == 1 and before["active"] is False

    job, _ = alpha.request(JobKind.UPGRADE, requested_by="test", queue=False)
    job.start()
    job.set_progress(3 * 1024, 12 * 1024, "layer 1/2")

    running = live(admin_client)
    (row,) = running["rows"]
    assert row["job"]["status"] == JobStatus.RUNNING and row["job"]["percent"] == 25.0
    assert row["job"]["text"] == "Upgrade running 25%"
    assert f'href="/jobs/{job.pk}/"' in row["html"] and "Upgrade running 25%" in row["html"]
    assert "<button" not in row["html"]
    assert row["sig"] != before["rows"][0]["sig"]
    assert running["active"] is True and [j["id"] for j in running["jobs"]] == [job.pk]
    assert live(admin_client)["rows"][0]["sig"] == row["sig"]  # nothing changed, same signature

    InstalledVersion.objects.filter(backend=alpha, state="current").update(version="v2")
    alpha.record_installed(version="v2", digest="sha256:" + "a" * 64)
    job.finish("alpha v2 installed")

    after = live(admin_client)
    (row,) = after["rows"]
    assert (row["state"], row["job"]) == ("up_to_date", None)
    assert "Up to date" in row["html"] and after["upgradable"] == 0 and after["active"] is False


def test_the_rows_forms_return_to_the_page_not_elsewhere(admin_client: Any, alpha: Backend) -> None:
    row = live(admin_client, next="/?updates=1")["rows"][0]
    assert 'name="next" value="/?updates=1"' in row["html"]
    row = live(admin_client, next="https://evil.example/")["rows"][0]
    assert 'name="next" value="/"' in row["html"]


def test_updates_only_applies_to_the_live_rows(admin_client: Any, alpha: Backend) -> None:
    install_row(Backend.objects.get(name="gamma"), "v1")
    assert [r["name"] for r in live(admin_client)["rows"]] == ["alpha", "gamma"]
    assert [r["name"] for r in live(admin_client, updates="1")["rows"]] == ["alpha"]


def test_live_updates_cost_a_fixed_number_of_queries(
    admin_client: Any, alpha: Backend, gallery_factory: Any
) -> None:
    live(admin_client)
    with CaptureQueriesContext(connection) as few:
        live(admin_client)
    gallery_factory(
        [{"name": f"b{i:02}", "uri": f"127.0.0.1:9/demo/b{i}:latest"} for i in range(40)], name="more"
    )
    other = Node.objects.create(name="node-b", backends_path="/srv/b")
    for backend in Backend.objects.filter(gallery__name="more"):
        install_row(backend, "v1")
        install_row(backend, "v0", node=other)
        UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=backend, node=other)
    with CaptureQueriesContext(connection) as many:
        state = live(admin_client)
    assert len(state["rows"]) == 81 and len(state["jobs"]) == 40
    assert len(many) == len(few), [q["sql"][:80] for q in many.captured_queries]


def test_anonymous_users_get_nothing(client: Any, alpha: Backend) -> None:
    response = client.get("/live/backends/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")
