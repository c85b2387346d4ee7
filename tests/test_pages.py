"""The web pages and the job websocket, through Django's test client and Channels' communicator.

Who may do what: signed-in users read, holders of the API's permission (and superusers) write;
anonymous users go to the sign-in page. The real browser, the real servers and live progress across
processes are in test_browser.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.models import Schedule

from backends_app import live
from backends_app.models import (
    Backend,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)
from backends_app.schedule import SCHEDULE_NAME
from tests.test_admin_actions import install_row

PAGES = ["/", "/jobs/1/", "/settings/"]


pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]


@pytest.fixture
def backends(gallery_factory: Any) -> dict[str, Backend]:
    """`alpha` (flagged: v1 -> v2, with a kept v0), `beta` (up to date), `gamma` (not installed)."""
    gallery_factory(
        [
            {"name": "alpha", "uri": "127.0.0.1:9/demo/alpha:latest", "description": "the first"},
            {"name": "beta", "uri": "127.0.0.1:9/demo/beta:latest"},
            {"name": "gamma", "uri": "127.0.0.1:9/demo/gamma:latest", "description": "speech to text"},
        ]
    )
    rows = {b.name: b for b in Backend.objects.all()}
    install_row(rows["alpha"], "v1")
    install_row(rows["alpha"], "v0", state=InstalledVersion.State.KEPT)
    install_row(rows["beta"], "v5")
    now = timezone.now()
    Backend.objects.filter(name="alpha").update(
        upgrade_available=True,
        available_version="v2",
        upgrade_reason="v2 is newer than v1",
        last_checked_at=now,
    )
    Backend.objects.filter(name="beta").update(available_version="v5", last_checked_at=now)
    for row in rows.values():
        row.refresh_from_db()
    return rows


@pytest.fixture
def member(client: Any) -> Any:
    """A signed-in user who is not staff."""
    user = get_user_model().objects.create_user("member", password="pw")
    client.force_login(user)
    return client


def row_of(page: str, name: str) -> str:
    match = re.search(rf'<tr [^>]*data-backend="{re.escape(name)}".*?</tr>', page, re.S)
    assert match, f"no row for {name}"
    return match.group(0)


# --- who may see and do what ------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("url", PAGES)
def test_anonymous_users_are_sent_to_sign_in(client: Any, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={url}"


@pytest.mark.django_db
def test_sign_in_page_signs_in_and_goes_to_the_page_asked_for(client: Any) -> None:
    get_user_model().objects.create_user("member", password="a-long-password")
    assert 'name="username"' in client.get("/login/").content.decode()
    response = client.post("/login/", {"username": "member", "password": "a-long-password", "next": "/jobs/"})
    assert response.status_code == 302 and response["Location"] == "/jobs/"
    client.logout()
    wrong = client.post("/login/", {"username": "member", "password": "nope"})
    assert "did not match" in wrong.content.decode()


@pytest.mark.django_db
def test_members_see_the_backends_page_without_buttons(member: Any, backends: dict[str, Backend]) -> None:
    page = member.get("/").content.decode()
    assert "alpha" in page and "gamma" in page
    assert "<button" not in row_of(page, "alpha")
    assert 'id="upgrade-all"' not in page


@pytest.mark.django_db
def test_members_cannot_write(member: Any, backends: dict[str, Backend]) -> None:
    alpha = backends["alpha"]
    assert member.post(f"/backends/{alpha.pk}/upgrade/").status_code == 403
    assert member.post("/backends/upgrade-all/").status_code == 403
    assert member.post("/check/").status_code == 403
    assert member.get("/settings/").status_code == 403
    assert (
        member.post("/settings/", {"check_interval_minutes": "60", "versions_kept": "1"}).status_code == 403
    )
    assert not UpgradeJob.objects.exists()
    assert PortalSettings.load().check_interval_minutes == 360


@pytest.mark.django_db
def test_the_operate_permission_lets_a_member_upgrade(member: Any, backends: dict[str, Backend]) -> None:
    user = get_user_model().objects.get(username="member")
    user.user_permissions.add(Permission.objects.get(codename="operate_backend"))
    response = member.post(f"/backends/{backends['alpha'].pk}/upgrade/")
    job = UpgradeJob.objects.get()
    assert response["Location"] == f"/jobs/{job.pk}/"
    assert job.requested_by == "web:member"


# --- the backends page ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_backends_page_shows_versions_upgrades_and_the_buttons_that_apply(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    page = admin_client.get("/").content.decode()
    alpha = row_of(page, "alpha")
    assert ">v1</span>" in alpha and ">v2</span>" in alpha
    assert "Upgrade available" in alpha and "v2 is newer than v1" in alpha
    assert 'data-action="upgrade"' in alpha and 'data-action="rollback"' in alpha
    beta = row_of(page, "beta")
    assert "Up to date" in beta
    assert 'data-action="reinstall"' in beta and 'data-action="rollback"' not in beta
    gamma = row_of(page, "gamma")
    assert 'data-action="install"' in gamma and "speech to text" in gamma
    assert 'Upgrade all (<span id="upgradable">1</span>)' in page


@pytest.mark.django_db
def test_updates_only_lists_the_flagged_backends(admin_client: Any, backends: dict[str, Backend]) -> None:
    installed = admin_client.get("/?updates=1").context["rows"]
    assert [row.installed.name for row in installed] == ["alpha"]


@pytest.mark.django_db
def test_pinned_backends_offer_no_upgrade_button(admin_client: Any, backends: dict[str, Backend]) -> None:
    backends["alpha"].pin()
    alpha = row_of(admin_client.get("/").content.decode(), "alpha")
    assert "pinned" in alpha and 'data-action="upgrade"' not in alpha
    assert 'Upgrade all (<span id="upgradable">0</span>)' in admin_client.get("/").content.decode()


@pytest.mark.django_db
def test_gallery_backends_are_searched_and_paged(admin_client: Any, gallery_factory: Any) -> None:
    gallery_factory(
        [{"name": f"model-{i:02}", "uri": f"127.0.0.1:9/demo/m{i}:latest"} for i in range(60)]
        + [{"name": "whisper", "uri": "127.0.0.1:9/demo/w:latest", "alias": "stt"}],
        name="big",
    )
    first = admin_client.get("/")
    assert first.context["page"].paginator.count == 61
    assert len(first.context["gallery_rows"]) == 25
    assert 'href="?page=2"' in first.content.decode()
    third = admin_client.get("/?page=3")
    assert [row.backend.name for row in third.context["gallery_rows"]] == [
        *(f"model-{i}" for i in range(50, 60)),
        "whisper",
    ]
    found = admin_client.get("/?q=stt")
    assert [row.backend.name for row in found.context["gallery_rows"]] == ["whisper"]


@pytest.mark.django_db
def test_backends_page_costs_a_fixed_number_of_queries(
    admin_client: Any, gallery_factory: Any, django_assert_max_num_queries: Any
) -> None:
    def grow(count: int) -> None:
        gallery_factory([{"name": f"b{i:03}", "uri": f"127.0.0.1:9/demo/b{i}:latest"} for i in range(count)])
        other, _ = Node.objects.get_or_create(name="node-b", defaults={"backends_path": "/srv/b"})
        # Half installed, half not: both tables of the page have rows.
        for backend in Backend.objects.filter(installed__isnull=True)[: count // 2]:
            install_row(backend, "v1")
            install_row(backend, "v1", node=other)
            install_row(backend, "v0", state=InstalledVersion.State.KEPT)
            UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=backend, node=other)

    grow(2)
    admin_client.get("/")
    with CaptureQueriesContext(connection) as small:
        admin_client.get("/")
    grow(80)
    with django_assert_max_num_queries(len(small)):
        response = admin_client.get("/")
    assert len(response.context["rows"]) >= 80  # 40 backends on two nodes
    assert len(response.context["gallery_rows"]) == 25
    # Session and user; backends, their installed rows and active jobs, adopted directories; the
    # gallery list's count and page, its jobs, what installing would replace, the names several
    # galleries share, the tags; the galleries' sync state, the settings, the running check.
    assert len(small) <= 15


# --- operations from the page -----------------------------------------------------------------------


@pytest.mark.django_db
def test_upgrade_button_queues_the_upgrade_and_opens_its_job(
    admin_client: Any, backends: dict[str, Backend], django_capture_on_commit_callbacks: Any
) -> None:
    alpha = backends["alpha"]
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(f"/backends/{alpha.pk}/upgrade/", {"node": Node.local().pk})
    job = UpgradeJob.objects.get()
    assert (job.kind, job.backend, job.node, job.requested_by) == (
        JobKind.UPGRADE,
        alpha,
        Node.local(),
        "web:admin",
    )
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.pk}/"
    again = admin_client.post(f"/backends/{alpha.pk}/upgrade/", follow=True)
    assert UpgradeJob.objects.count() == 1
    assert again.redirect_chain[-1][0] == f"/jobs/{job.pk}/"
    assert "alpha: already queued as" in again.content.decode()
    row = row_of(admin_client.get("/").content.decode(), "alpha")
    assert f'href="/jobs/{job.pk}/"' in row and "<button" not in row


@pytest.mark.django_db
def test_refused_operations_come_back_with_the_reason(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    backends["alpha"].pin()
    response = admin_client.post(
        f"/backends/{backends['alpha'].pk}/upgrade/", {"next": "/?updates=1"}, follow=True
    )
    assert response.redirect_chain[-1][0] == "/?updates=1"
    assert "alpha is pinned" in response.content.decode()
    response = admin_client.post(f"/backends/{backends['beta'].pk}/rollback/", follow=True)
    assert "beta has no kept version" in response.content.decode()
    outside = admin_client.post(
        f"/backends/{backends['beta'].pk}/rollback/", {"next": "https://evil.example/"}
    )
    assert outside["Location"] == "/"
    assert not UpgradeJob.objects.exists()
    assert admin_client.post(f"/backends/{backends['beta'].pk}/uninstall/").status_code == 404
    assert admin_client.get(f"/backends/{backends['beta'].pk}/upgrade/").status_code == 405


@pytest.mark.django_db
def test_converge_button_shows_with_drift_and_upgrades_the_lagging_node(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    assert 'data-action="converge"' not in admin_client.get("/").content.decode()
    other = Node.objects.create(name="gpu-box", backends_path="/srv/backends")
    install_row(backends["beta"], "v6", node=other, digest="sha256:" + "c" * 64)
    page = admin_client.get("/").content.decode()
    assert page.count('data-action="converge"') == 1
    assert "drift" in row_of(page, "beta")
    response = admin_client.post(f"/backends/{backends['beta'].pk}/converge/")
    parent = UpgradeJob.objects.get(parent=None)
    assert response["Location"] == f"/jobs/{parent.pk}/"
    assert [child.node.name for child in parent.children.all()] == ["test-node"]
    job_page = admin_client.get(f"/jobs/{parent.pk}/").content.decode()
    assert "Jobs it started" in job_page and "test-node" in job_page


@pytest.mark.django_db
def test_install_button_installs_a_gallery_backend(admin_client: Any, backends: dict[str, Backend]) -> None:
    response = admin_client.post(f"/backends/{backends['gamma'].pk}/install/")
    job = UpgradeJob.objects.get()
    assert (job.kind, job.backend.name) == (JobKind.INSTALL, "gamma")
    assert response["Location"] == f"/jobs/{job.pk}/"


@pytest.mark.django_db
def test_upgrade_all_upgrades_the_flagged_unpinned_backends(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    Backend.objects.filter(name="beta").update(upgrade_available=True, upgrade_reason="newer", pinned=True)
    response = admin_client.post("/backends/upgrade-all/", follow=True)
    job = UpgradeJob.objects.get()
    assert (job.kind, job.backend.name) == (JobKind.UPGRADE, "alpha")
    assert f'Queued 1 upgrade(s): <a href="/jobs/{job.pk}/">job #{job.pk}</a>' in response.content.decode()
    again = admin_client.post("/backends/upgrade-all/", follow=True)
    assert UpgradeJob.objects.count() == 1
    assert "alpha: already queued as" in again.content.decode()


@pytest.mark.django_db
def test_check_now_opens_the_check_job(admin_client: Any, backends: dict[str, Backend]) -> None:
    response = admin_client.post("/check/")
    check = UpgradeJob.objects.get(kind=JobKind.CHECK)
    assert response["Location"] == f"/jobs/{check.pk}/"
    assert check.requested_by == "web:admin"
    admin_client.post("/check/")
    assert UpgradeJob.objects.filter(kind=JobKind.CHECK).count() == 1


# --- the job page -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_job_page_renders_the_state_the_script_starts_from(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    job, _ = backends["alpha"].request(JobKind.UPGRADE, requested_by="web:admin", queue=False)
    job.start()
    job.set_phase("downloading", "downloading the image")
    job.set_progress(3 * 1024 * 1024, 12 * 1024 * 1024, "layer 1/2")
    response = admin_client.get(f"/jobs/{job.pk}/")
    page = response.content.decode()
    assert f"Job #{job.pk}: Upgrade alpha" in page
    assert 'id="job-progress" max="100" value="25.0"' in page
    assert "3.0\xa0MiB of 12.0\xa0MiB" in page
    state = json.loads(
        re.search(r'<script id="job-state" type="application/json">(.*?)</script>', page).group(1)
    )
    assert state["bytes_done"] == 3 * 1024 * 1024 and state["active"] and state["phase"] == "downloading"
    assert 'id="cancel-form"' in page
    assert admin_client.get("/jobs/999999/").status_code == 404


@pytest.mark.django_db
def test_cancel_button_cancels_a_queued_job(admin_client: Any, backends: dict[str, Backend]) -> None:
    job, _ = backends["alpha"].request(JobKind.UPGRADE, requested_by="web:admin", queue=False)
    response = admin_client.post(f"/jobs/{job.pk}/cancel/", follow=True)
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert 'class="outcome outcome-cancelled"' in response.content.decode()


# --- the settings page ------------------------------------------------------------------------------

VALID = {
    "auto_upgrade_backends": "on",
    "check_interval_minutes": "120",
    "maintenance_window_start": "02:00",
    "maintenance_window_end": "04:30",
    "versions_kept": "3",
}


@pytest.mark.django_db
def test_settings_page_saves_valid_settings(admin_client: Any) -> None:
    response = admin_client.post("/settings/", VALID, follow=True)
    assert "Settings saved." in response.content.decode()
    stored = PortalSettings.load()
    assert stored.auto_upgrade_backends is True
    assert stored.check_interval_minutes == 120
    assert (stored.maintenance_window_start, stored.maintenance_window_end) == (dt.time(2), dt.time(4, 30))
    assert stored.versions_kept == 3
    # Unticking the box and clearing the window store "off" and "no window".
    admin_client.post(
        "/settings/",
        {**VALID, "auto_upgrade_backends": "", "maintenance_window_start": "", "maintenance_window_end": ""},
    )
    stored.refresh_from_db()
    assert stored.auto_upgrade_backends is False and stored.maintenance_window_start is None


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "field", "error"),
    [
        ({"check_interval_minutes": "1"}, "check_interval_minutes", "greater than or equal to 5"),
        ({"check_interval_minutes": "soon"}, "check_interval_minutes", "Enter a whole number"),
        ({"versions_kept": "11"}, "versions_kept", "less than or equal to 10"),
        ({"maintenance_window_end": ""}, "__all__", "needs both a start and an end"),
        ({"maintenance_window_end": "02:00"}, "__all__", "start and end must differ"),
        ({"maintenance_window_start": "25:00"}, "maintenance_window_start", "Enter a valid time"),
    ],
)
def test_settings_page_shows_errors_and_saves_nothing(
    admin_client: Any, change: dict[str, str], field: str, error: str
) -> None:
    before = PortalSettings.load()
    response = admin_client.post("/settings/", {**VALID, **change})
    assert response.status_code == 200
    assert error in " ".join(response.context["form"].errors[field])
    assert error in response.content.decode()
    assert "Nothing was saved" in response.content.decode()
    after = PortalSettings.load()
    assert (after.auto_upgrade_backends, after.check_interval_minutes, after.versions_kept) == (
        before.auto_upgrade_backends,
        before.check_interval_minutes,
        before.versions_kept,
    )
    assert after.updated_at == before.updated_at


@pytest.mark.django_db
def test_settings_page_says_when_checks_ran_and_run_next(admin_client: Any) -> None:
    last = timezone.now() - dt.timedelta(minutes=30)
    PortalSettings.objects.filter(pk=PortalSettings.load().pk).update(last_check_at=last)
    Schedule.objects.filter(name=SCHEDULE_NAME).delete()
    response = admin_client.get("/settings/")
    assert response.context["next_check_at"] == last + dt.timedelta(minutes=360)
    scheduled = timezone.now() + dt.timedelta(hours=2)
    Schedule.objects.update_or_create(
        name=SCHEDULE_NAME,
        defaults={
            "func": "backends_app.tasks.scheduled_check",
            "schedule_type": Schedule.MINUTES,
            "minutes": 360,
            "next_run": scheduled,
        },
    )
    response = admin_client.get("/settings/")
    assert response.context["next_check_at"] == scheduled
    assert f'datetime="{scheduled.isoformat()}"' in response.content.decode()


# --- the websocket ----------------------------------------------------------------------------------


def websocket(
    path: str, *, session: str = "", origin: str = "http://127.0.0.1:8000"
) -> WebsocketCommunicator:
    from portal.asgi import application

    headers = [(b"origin", origin.encode()), (b"host", b"127.0.0.1:8000")]
    if session:
        headers.append((b"cookie", f"sessionid={session}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


@pytest.fixture
def session(admin_user: Any, client: Any) -> str:
    client.force_login(admin_user)
    return client.cookies["sessionid"].value


@pytest.fixture
def running_job(backends: dict[str, Backend]) -> UpgradeJob:
    job, _ = backends["alpha"].request(JobKind.UPGRADE, requested_by="t", queue=False)
    job.start()
    return job


@pytest.mark.django_db(transaction=True)
def test_websocket_refuses_anonymous_users_and_foreign_origins(running_job: UpgradeJob, session: str) -> None:
    async def attempt(**kwargs: Any) -> bool:
        communicator = websocket(f"/ws/jobs/{running_job.pk}/", **kwargs)
        connected, _ = await communicator.connect()
        await communicator.disconnect()
        return connected

    assert async_to_sync(attempt)() is False
    assert async_to_sync(attempt)(session=session, origin="http://evil.example") is False
    assert async_to_sync(attempt)(session=session) is True


@pytest.mark.django_db(transaction=True)
def test_websocket_sends_the_state_then_each_change_until_the_end(
    running_job: UpgradeJob, session: str
) -> None:
    """The embedded shape (in-memory layer): the consumer reads the row and sends only changes."""
    assert not live.cross_process_layer()

    async def follow() -> list[dict[str, Any]]:
        communicator = websocket(f"/ws/jobs/{running_job.pk}/", session=session)
        connected, _ = await communicator.connect()
        assert connected
        seen = [await communicator.receive_json_from(timeout=30)]
        change = asyncio.get_running_loop().run_in_executor
        await change(None, running_job.set_progress, 100, 400, "layer 1/1")
        seen.append(await communicator.receive_json_from(timeout=30))
        await asyncio.sleep(0.5)  # two polls, no change: nothing sent
        assert await communicator.receive_nothing(timeout=0.1)
        await change(None, running_job.finish, "alpha v2 installed")
        seen.append(await communicator.receive_json_from(timeout=30))
        await communicator.disconnect()
        return seen

    first, progress, final = async_to_sync(follow)()
    assert (first["status"], first["bytes_done"], first["active"]) == (JobStatus.RUNNING, 0, True)
    assert (progress["bytes_done"], progress["bytes_total"], progress["percent"]) == (100, 400, 25.0)
    assert (final["status"], final["active"], final["message"]) == (
        JobStatus.SUCCEEDED,
        False,
        "alpha v2 installed",
    )


@pytest.mark.django_db(transaction=True)
def test_websocket_closes_for_a_job_that_does_not_exist(session: str) -> None:
    async def attempt() -> bool:
        communicator = websocket("/ws/jobs/999999/", session=session)
        connected, _ = await communicator.connect()
        return connected

    assert async_to_sync(attempt)() is False


@pytest.mark.django_db
def test_a_channel_layer_failure_never_breaks_the_job(
    running_job: UpgradeJob, settings: Any, caplog: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from tests.helpers.processes import free_port

    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{free_port()}/0"]},
        }
    }
    assert live.cross_process_layer()
    with (
        caplog.at_level(logging.WARNING, logger="backends_app.live"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        running_job.set_progress(5, 10, "layer 1/1")
    running_job.refresh_from_db()
    assert (running_job.bytes_done, running_job.percent) == (5, 50.0)
    assert "could not publish job" in caplog.text
