"""Notifications through Apprise, delivered to a real HTTP receiver on loopback (Apprise's json://
webhook): each thing told once, digests, retries, timeouts, "send test", and URLs kept secret."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import run_checks
from django.utils import timezone

from backends_app import jobs, notifications, tasks
from backends_app.models import (
    Backend,
    Gallery,
    JobKind,
    JobStatus,
    Node,
    NotificationDelivery,
    NotificationEvent,
    NotificationMessage,
    NotificationTarget,
    UpgradeJob,
)
from tests.conftest import run_op
from tests.helpers.api import client_for, install, make_user

pytestmark = pytest.mark.django_db

BASE = "https://portal.example.test"
SECRET = "s3cr3tT0kenXYZ"


# --- a real receiver --------------------------------------------------------------------------------


@dataclass
class Post:
    path: str
    status: int
    body: dict[str, Any]


@dataclass
class Receiver:
    """A threaded HTTP server recording each POST; per path it can answer 500 to the first N."""

    fail_first: dict[str, int] = field(default_factory=dict)
    posts: list[Post] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer = self
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?", 1)[0]
                with outer.lock:
                    failing = outer.fail_first.get(path, 0)
                    if failing:
                        outer.fail_first[path] = failing - 1
                    code = 500 if failing else 200
                    outer.posts.append(Post(path, code, json.loads(raw or b"{}")))
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def url(self, path: str = "/hooks/portal") -> str:
        return f"json://127.0.0.1:{self.server.server_address[1]}{path}"

    def accepted(self, path: str = "/hooks/portal") -> list[dict[str, Any]]:
        """The message bodies answered 200 on `path`: what the receiving service got."""
        with self.lock:
            return [p.body for p in self.posts if p.path == path and p.status == 200]

    def count(self, path: str = "/hooks/portal") -> int:
        with self.lock:
            return sum(1 for p in self.posts if p.path == path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    yield rx
    rx.stop()


@pytest.fixture(autouse=True)
def notify_settings(settings: Any) -> None:
    settings.PORTAL_BASE_URL = BASE
    settings.PORTAL_NOTIFY_WINDOW = 0
    settings.PORTAL_NOTIFY_TIMEOUT = 20
    settings.PORTAL_NOTIFY_ATTEMPTS = 5
    settings.PORTAL_NOTIFY_RETRY_SECONDS = 60


def target(url: str, label: str = "") -> NotificationTarget:
    return NotificationTarget.objects.create(url=url, label=label)


def run_check() -> UpgradeJob:
    job, created = UpgradeJob.request_check("test", queue=False)
    assert created
    return jobs.run(job.pk)


def titles(bodies: list[dict[str, Any]]) -> list[str]:
    return [body["title"] for body in bodies]


def failing_gallery(tmp_path: Path, name: str = "broken") -> Gallery:
    gallery = Gallery.objects.create(name=name, url=(tmp_path / f"{name}-missing.yaml").as_uri())
    assert not gallery.sync().ok
    return gallery


# --- once per thing ----------------------------------------------------------------------------------


@pytest.mark.registry
def test_repeated_checks_send_one_message_per_available_build(published: Any, receiver: Receiver) -> None:
    target(receiver.url())
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    second = published.push("v2")

    for _ in range(3):
        assert run_check().status == JobStatus.SUCCEEDED
        notifications.deliver()

    got = receiver.accepted()
    assert titles(got) == [
        f"Upgrade available: cpu-demo {published.first_digest[7:19]} \u2192 {second[7:19]}"
    ]
    assert "Where: test-node" in got[0]["message"]
    backend_page = f"{BASE}/admin/backends_app/backend/{published.backend.pk}/change/"
    assert backend_page in got[0]["message"]
    assert got[0]["type"] == "info"

    third = published.push("v3")
    for _ in range(2):
        run_check()
        notifications.deliver()

    assert titles(receiver.accepted()) == [
        titles(got)[0],
        f"Upgrade available: cpu-demo {published.first_digest[7:19]} \u2192 {third[7:19]}",
    ]
    assert NotificationEvent.objects.filter(kind="upgrade_available").count() == 2


@pytest.mark.registry
def test_a_failed_upgrade_is_told_once_naming_the_node_and_linking_the_job(
    published: Any, receiver: Receiver, gallery_factory: Any
) -> None:
    target(receiver.url())
    gallery_factory(
        [
            {
                "name": "cpu-demo",
                "uri": published.ref,
                "healthcheck": {"command": "sh -c 'grep -q good {path}/lib/version.txt'", "timeout": 10},
            }
        ]
    )
    backend = Backend.objects.lookup("cpu-demo")
    published.push("good-1")
    assert run_op(backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    published.push("bad-2")

    job = run_op(backend, JobKind.UPGRADE)
    notifications.deliver()
    notifications.deliver()

    assert job.status == JobStatus.ROLLED_BACK
    [got] = receiver.accepted()
    assert got["title"].startswith("Upgrade of cpu-demo")
    assert got["title"].endswith("was rolled back on test-node")
    assert "Where: test-node" in got["message"]
    assert "health check failed" in got["message"]
    assert f"{BASE}/jobs/{job.pk}/" in got["message"]
    assert got["type"] == "failure"


def test_a_node_going_offline_is_told_once_per_outage(receiver: Receiver) -> None:
    target(receiver.url())
    now = timezone.now()
    node = Node.objects.create(
        name="gpu-2", backends_path="/srv/gpu-2", last_heartbeat_at=now - dt.timedelta(minutes=5)
    )

    for _ in range(3):
        notifications.tick()

    assert titles(receiver.accepted()) == ["Node gpu-2 is offline"]
    assert "Where: gpu-2" in receiver.accepted()[0]["message"]

    node.heartbeat()  # back online
    notifications.tick()
    Node.objects.filter(pk=node.pk).update(last_heartbeat_at=timezone.now() - dt.timedelta(minutes=3))
    notifications.tick()
    notifications.tick()

    assert titles(receiver.accepted()) == ["Node gpu-2 is offline", "Node gpu-2 is offline"]


@pytest.mark.registry
def test_a_check_failing_n_times_in_a_row_is_told_once(
    settings: Any, receiver: Receiver, gallery_factory: Any, closed_port: int
) -> None:
    settings.PORTAL_NOTIFY_CHECK_FAILURES = 3
    settings.PORTAL_REGISTRY_RETRIES = 0
    target(receiver.url())
    gallery_factory([{"name": "unreachable", "uri": f"127.0.0.1:{closed_port}/demo/unreachable:latest"}])
    install(Backend.objects.lookup("unreachable"))

    outcomes = []
    for _ in range(4):
        outcomes.append(run_check().status)
        notifications.deliver()

    assert outcomes == [JobStatus.FAILED] * 4
    [got] = receiver.accepted()
    assert got["title"] == "The upgrade check failed 3 times in a row"
    third = UpgradeJob.objects.filter(kind=JobKind.CHECK).order_by("pk")[2]
    assert f"{BASE}/jobs/{third.pk}/" in got["message"]


# --- digests -------------------------------------------------------------------------------------------


def test_events_within_the_window_go_as_one_message(
    settings: Any, receiver: Receiver, tmp_path: Path
) -> None:
    settings.PORTAL_NOTIFY_WINDOW = 60
    target(receiver.url())
    failing_gallery(tmp_path)
    Node.objects.create(
        name="gpu-2", backends_path="/srv/gpu-2", last_heartbeat_at=timezone.now() - dt.timedelta(minutes=5)
    )
    gallery = Gallery.objects.create(name="drifting", url=(tmp_path / "x.yaml").as_uri())
    backend = Backend.objects.create(gallery=gallery, name="whisper", uri="example.test/whisper:latest")
    install(backend, version="1.0", digest="sha256:" + "1" * 64)
    install(backend, Node.objects.get(name="gpu-2"), version="2.0", digest="sha256:" + "2" * 64)

    assert notifications.watch() == 3
    start = timezone.now()
    notifications.deliver(start + dt.timedelta(seconds=30))  # inside the window: nothing yet

    assert receiver.count() == 0

    notifications.deliver(start + dt.timedelta(seconds=61))
    notifications.deliver(start + dt.timedelta(seconds=200))

    [got] = receiver.accepted()
    assert got["title"].startswith("Backend Portal: 3 events (")
    for expected in (
        "Gallery broken cannot be synced",
        "Node gpu-2 is offline",
        "whisper drifted: its nodes run different builds",
        "gpu-2 runs 2.0; test-node runs 1.0",
    ):
        assert expected in got["message"]
    assert got["type"] == "failure"  # the worst of the three
    assert NotificationMessage.objects.count() == 1


# --- retries, timeouts, dead receivers ---------------------------------------------------------------


def test_a_receiver_answering_500_then_200_gets_the_message_once_after_a_retry(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.fail_first["/flaky"] = 1
    target(receiver.url("/flaky"))
    failing_gallery(tmp_path)
    notifications.watch()
    start = timezone.now()

    notifications.deliver(start)
    delivery = NotificationDelivery.objects.get()

    assert (delivery.status, delivery.attempts) == (NotificationDelivery.Status.RETRYING, 1)
    assert "500" in delivery.last_error
    assert delivery.next_attempt_at == start + dt.timedelta(seconds=60)

    notifications.deliver(start + dt.timedelta(seconds=10))  # not yet due
    assert receiver.count("/flaky") == 1

    notifications.deliver(start + dt.timedelta(seconds=61))
    notifications.deliver(start + dt.timedelta(seconds=600))
    delivery.refresh_from_db()

    assert (delivery.status, delivery.attempts, delivery.last_error) == (
        NotificationDelivery.Status.DELIVERED,
        2,
        "",
    )
    assert delivery.delivered_at == start + dt.timedelta(seconds=61)
    assert receiver.count("/flaky") == 2
    assert titles(receiver.accepted("/flaky")) == ["Gallery broken cannot be synced"]


def test_a_receiver_that_keeps_failing_is_given_up_after_the_attempts_allowed(
    settings: Any, receiver: Receiver, tmp_path: Path
) -> None:
    settings.PORTAL_NOTIFY_ATTEMPTS = 3
    receiver.fail_first["/down"] = 100
    target(receiver.url("/down"))
    failing_gallery(tmp_path)
    notifications.watch()
    moment = timezone.now()

    for _ in range(6):
        notifications.deliver(moment)
        moment += dt.timedelta(hours=2)

    delivery = NotificationDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == (NotificationDelivery.Status.FAILED, 3)
    assert receiver.count("/down") == 3


@pytest.mark.registry
def test_a_dead_receiver_never_blocks_or_fails_the_job(
    published: Any, settings: Any, closed_port: int, silent_port: int
) -> None:
    settings.PORTAL_NOTIFY_TIMEOUT = 3
    refused = target(f"json://127.0.0.1:{closed_port}/hooks")
    silent = target(f"json://127.0.0.1:{silent_port}/hooks")
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    published.push("v2")

    job = run_check()  # records "upgrade available"; sends nothing itself

    assert job.status == JobStatus.SUCCEEDED and "1 upgrade" in job.message
    assert NotificationDelivery.objects.count() == 0
    start = timezone.now()
    notifications.deliver(start)
    notifications.deliver(start + dt.timedelta(hours=1))

    down = NotificationDelivery.objects.get(target=refused)
    assert down.status == NotificationDelivery.Status.RETRYING and down.attempts == 2
    assert "Connection error" in down.last_error
    # No answer: it may have arrived, so it is never sent again (no duplicate).
    hanging = NotificationDelivery.objects.get(target=silent)
    assert hanging.status == NotificationDelivery.Status.UNKNOWN and hanging.attempts == 1
    assert "may have been delivered" in hanging.last_error
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED


# --- send test, permissions, secrets ----------------------------------------------------------------


@pytest.fixture
def settings_user(db: Any) -> Any:
    return make_user("ops", staff=True, perms=("backends_app.change_portalsettings",))


def test_send_test_reports_success_and_failure_per_url_in_the_api(
    receiver: Receiver, closed_port: int, settings_user: Any
) -> None:
    none_yet = client_for(settings_user).post("/api/v1/notification-targets/test/", {}, format="json")
    assert none_yet.status_code == 409 and "No notification URL is enabled" in none_yet.json()["detail"]
    good = target(receiver.url(), "ops")
    bad = target(f"json://127.0.0.1:{closed_port}/hooks", "dead")

    response = client_for(settings_user).post("/api/v1/notification-targets/test/", {}, format="json")

    assert response.status_code == 200
    results = {row["id"]: row for row in response.json()["results"]}
    assert results[good.pk]["ok"] is True and results[good.pk]["result"] == "delivered"
    assert results[bad.pk]["ok"] is False and results[bad.pk]["result"] == "failed"
    assert "Connection error" in results[bad.pk]["detail"]
    assert titles(receiver.accepted()) == ["Backend Portal: test message"]

    one = client_for(settings_user).post(f"/api/v1/notification-targets/{good.pk}/test/", format="json")
    assert one.status_code == 200 and [r["ok"] for r in one.json()["results"]] == [True]
    assert len(receiver.accepted()) == 2


def test_send_test_on_the_settings_page_and_in_the_admin(
    client: Any, receiver: Receiver, closed_port: int, settings_user: Any
) -> None:
    good = target(receiver.url(), "ops")
    bad = target(f"json://127.0.0.1:{closed_port}/hooks", "dead")
    client.force_login(settings_user)

    page = client.post("/settings/notifications/test/", follow=True).content.decode()

    assert f"Test message delivered to {good}" in page
    assert f"Test message to {bad}: failed: A Connection error" in page

    admin = client.post(
        "/admin/backends_app/notificationtarget/",
        {"action": "send_test", "_selected_action": [good.pk, bad.pk]},
        follow=True,
    ).content.decode()

    assert f"Test message delivered to {good}" in admin
    assert f"Test message to {bad}: failed" in admin
    assert len(receiver.accepted()) == 2


@pytest.fixture
def portal_log() -> Iterator[list[str]]:
    """Every record that reaches the root logger (where the portal's handlers are), at DEBUG."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.name}: {record.getMessage()}")

    root, handler = logging.getLogger(), Keep(logging.DEBUG)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


def test_urls_are_added_checked_and_never_shown_whole(
    client: Any, receiver: Receiver, settings_user: Any, tmp_path: Path, portal_log: list[str]
) -> None:
    secret_url = f"json://user:hunter2pass@127.0.0.1:{receiver.server.server_address[1]}/hooks/{SECRET}"
    api = client_for(settings_user)

    made = api.post("/api/v1/notification-targets/", {"url": secret_url, "label": "ops"}, format="json")

    assert made.status_code == 201, made.json()
    port = receiver.server.server_address[1]
    assert made.json()["masked_url"] == f"json://user:****@127.0.0.1:{port}/****"
    assert NotificationTarget.objects.get().url == secret_url
    assert api.post("/api/v1/notification-targets/", {"url": secret_url}, format="json").status_code == 400
    bad = api.post("/api/v1/notification-targets/", {"url": "nonsense://x"}, format="json")
    assert bad.status_code == 400 and "url" in bad.json()
    assert NotificationTarget.objects.count() == 1

    failing_gallery(tmp_path)
    notifications.tick()
    assert titles(receiver.accepted(f"/hooks/{SECRET}")) == ["Gallery broken cannot be synced"]

    client.force_login(settings_user)
    pk = NotificationTarget.objects.get().pk
    shown = [
        api.get("/api/v1/notification-targets/").content.decode(),
        api.get(f"/api/v1/notification-targets/{pk}/").content.decode(),
        client.get("/settings/").content.decode(),
        client.get("/admin/backends_app/notificationtarget/").content.decode(),
        client.get(f"/admin/backends_app/notificationtarget/{pk}/change/").content.decode(),
        client.get("/admin/backends_app/notificationdelivery/").content.decode(),
        "\n".join(portal_log),
    ]
    for text in shown:
        assert SECRET not in text and "hunter2pass" not in text
    assert f"127.0.0.1:{port}/****" in shown[2]


def test_the_admin_change_form_keeps_the_stored_url_when_left_blank(client: Any, settings_user: Any) -> None:
    stored = target(f"json://127.0.0.1:9/hooks/{SECRET}", "ops")
    client.force_login(settings_user)

    response = client.post(
        f"/admin/backends_app/notificationtarget/{stored.pk}/change/",
        {"label": "renamed", "url": "", "enabled": "on"},
    )

    assert response.status_code == 302
    stored.refresh_from_db()
    assert (stored.label, stored.url) == ("renamed", f"json://127.0.0.1:9/hooks/{SECRET}")


def test_the_urls_need_the_settings_permission_even_to_read(client: Any) -> None:
    target(f"json://127.0.0.1:9/hooks/{SECRET}")
    operator = make_user("operator", staff=True, perms=("backends_app.operate_backend",))
    api = client_for(operator)

    assert api.get("/api/v1/notification-targets/").status_code == 403
    assert (
        api.post("/api/v1/notification-targets/", {"url": "json://127.0.0.1:9/x"}, format="json").status_code
        == 403
    )
    assert api.post("/api/v1/notification-targets/test/", {}, format="json").status_code == 403
    client.force_login(operator)
    assert client.post("/settings/notifications/", {"url": "json://127.0.0.1:9/x"}).status_code == 403
    assert client.post("/settings/notifications/test/").status_code == 403
    assert client.get("/admin/backends_app/notificationtarget/").status_code == 403
    assert client.get("/admin/backends_app/notificationevent/").status_code == 200  # no secret there
    assert NotificationTarget.objects.count() == 1


def test_the_settings_page_adds_toggles_and_removes_a_url(client: Any, settings_user: Any) -> None:
    client.force_login(settings_user)

    page = client.post(
        "/settings/notifications/", {"url": f"json://127.0.0.1:9/hooks/{SECRET}", "label": "ops"}, follow=True
    ).content.decode()

    assert "json://127.0.0.1:9/**** added" in page and SECRET not in page
    made = NotificationTarget.objects.get()
    refused = client.post("/settings/notifications/", {"url": "nonsense://x"}, follow=True).content.decode()
    assert "Nothing was added: Apprise cannot use this nonsense:// URL" in refused
    client.post(f"/settings/notifications/{made.pk}/toggle/")
    made.refresh_from_db()
    assert not made.enabled
    client.post(f"/settings/notifications/{made.pk}/remove/")
    assert not NotificationTarget.objects.exists()


def test_portal_notify_urls_give_the_initial_list_once(settings: Any, receiver: Receiver) -> None:
    settings.PORTAL_NOTIFY_URLS = [receiver.url("/a"), receiver.url("/b")]

    made = NotificationTarget.seed_from_settings()

    assert sorted(t.url for t in made) == settings.PORTAL_NOTIFY_URLS
    made[0].delete()
    assert NotificationTarget.seed_from_settings() == []  # the stored list wins from now on
    assert NotificationTarget.objects.count() == 1


def test_a_bad_notify_url_or_base_url_is_a_system_check_error_without_the_url(settings: Any) -> None:
    settings.PORTAL_NOTIFY_URLS = ["json://127.0.0.1/ok", f"nonsense://{SECRET}"]
    settings.PORTAL_BASE_URL = "portal.example.test"

    errors = {e.id: e.msg for e in run_checks() if e.id in ("portal.E030", "portal.E031")}

    assert errors["portal.E030"].startswith("PORTAL_NOTIFY_URLS item 2: Apprise cannot use this nonsense://")
    assert SECRET not in errors["portal.E030"]
    assert "PORTAL_BASE_URL" in errors["portal.E031"]


def test_the_notification_task_is_scheduled_every_minute(receiver: Receiver, tmp_path: Path) -> None:
    from django_q.models import Schedule

    row = Schedule.objects.get(name=notifications.SCHEDULE_NAME)
    assert (row.func, row.schedule_type, row.minutes) == (
        "backends_app.tasks.notifications_tick",
        Schedule.MINUTES,
        1,
    )
    target(receiver.url())
    failing_gallery(tmp_path)

    said = tasks.notifications_tick()

    assert said.startswith("1 new event(s); 1 message made")
    assert titles(receiver.accepted()) == ["Gallery broken cannot be synced"]
