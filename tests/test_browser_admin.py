"""The admin as the operator's console, in a real browser against the real portal: daphne and a worker
in their own processes, a real registry behind the throttling proxy of test_browser.py.

One flow on one portal: the dashboard shows what real operations left (a real check's upgrades and
reasons, a failed install, a gallery that cannot be read, the nodes, the last and next check), each
item linking to its object; a backend's page upgrades it with its button and the job's page in the
admin shows the progress live, with the job's log, which is the same after a reload; the page then
offers the rollback to the kept version (and, once rolled back, no "rollback" forward), and releasing
the hold is recorded; the dashboard shows a running job's progress live; every changelist fits
1400 px. A second test watches a fan-out's children change state live on the parent's admin page.

`PORTAL_SCREENSHOTS=1` saves docs/screenshots/admin-dashboard.png and admin-backend.png.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.db import connections
from django.utils import timezone
from django_q.models import Schedule

from backends_app import jobs
from backends_app.models import (
    Backend,
    Gallery,
    InstalledVersion,
    JobKind,
    JobMessage,
    JobStatus,
    Node,
    UpgradeJob,
)
from backends_app.schedule import SCHEDULE_NAME
from backends_app.templatetags.portal_format import format_moment
from tests.conftest import LOCALAI_INDEX, image, live_version, run_op
from tests.test_browser import (  # noqa: F401  (fixtures)
    BIG_LAYER,
    PASSWORD,
    SCREENSHOTS,
    THROTTLE_RATE,
    Portal,
    ThrottlingProxy,
    browser,
    sign_in,
    watch_progress,
)

pytestmark = [pytest.mark.single_pass, pytest.mark.registry]

WIDTH = 1400
CHANGELISTS = [
    "/admin/backends_app/backend/",
    "/admin/backends_app/backend/?installed=yes",
    "/admin/backends_app/upgradejob/",
    "/admin/backends_app/installedversion/",
    "/admin/backends_app/node/",
    "/admin/backends_app/gallery/",
]


def big_image(version: str) -> list[Any]:
    """A version with two layers big enough that the throttled download takes a few seconds."""
    return [
        image(version),
        {"lib/weights-a.bin": os.urandom(BIG_LAYER)},
        {"lib/weights-b.bin": os.urandom(BIG_LAYER)},
    ]


@pytest.fixture
def proxy(registry: Any) -> Iterator[ThrottlingProxy]:
    server = ThrottlingProxy(registry.host, THROTTLE_RATE)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def console(registry: Any, proxy: ThrottlingProxy, gallery_factory: Any) -> dict[str, Any]:
    """What real operations leave behind for the dashboard to show.

    `cpu-demo` (through the throttling proxy) and `tts-demo` installed at v1, each tag then moved to
    v2, and a real check that flags both; `broken-demo`, whose image is not in the registry, failed
    to install; a gallery that cannot be read; LocalAI's real gallery, for the lists' widths.
    """
    demo_repo, tts_repo = registry.unique_repo(), registry.unique_repo()
    registry.push_image(image("v1"), repo=demo_repo, tag="latest", version="v1")
    registry.push_image(image("v1"), repo=tts_repo, tag="latest", version="v1")
    gallery_factory(
        [
            {"name": "cpu-demo", "uri": f"{proxy.host}/{demo_repo}:latest", "alias": "demo", "tags": ["LLM"]},
            {"name": "tts-demo", "uri": registry.ref(tts_repo, "latest"), "tags": ["text-to-speech"]},
            {"name": "broken-demo", "uri": registry.ref(registry.unique_repo(), "latest")},
        ]
    )
    demo, tts, broken = (Backend.objects.lookup(name) for name in ("cpu-demo", "tts-demo", "broken-demo"))
    for backend in (demo, tts):
        assert run_op(backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    failed = run_op(broken, JobKind.INSTALL)
    assert failed.status == JobStatus.FAILED
    registry.push_image(big_image("v2"), repo=demo_repo, tag="latest", version="v2")
    registry.push_image(image("v2"), repo=tts_repo, tag="latest", version="v2")
    check, _ = UpgradeJob.request_check("test", queue=False)
    check = jobs.run(check.pk)
    assert check.status == JobStatus.SUCCEEDED, check.error
    assert set(Backend.objects.filter(upgrade_available=True).values_list("name", flat=True)) == {
        "cpu-demo",
        "tts-demo",
    }
    unreadable = Gallery.objects.create(name="unreadable", url="file:///nowhere/index.yaml")
    assert not unreadable.sync().ok
    localai, _ = Gallery.objects.update_or_create(name="localai", defaults={"url": LOCALAI_INDEX.as_uri()})
    assert localai.sync(force=True).ok
    Node.objects.create(name="far-node", backends_path="/srv/far")  # registered once, never heard from
    return {"demo": demo, "tts": tts, "failed": failed, "check": check, "unreadable": unreadable}


def open_admin(page: Any, base: str, path: str = "/admin/") -> None:
    page.goto(f"{base}{path}")
    page.wait_for_selector("#site-name")


def href_of(page: Any, selector: str) -> str:
    return str(page.locator(selector).first.get_attribute("href"))


def log_shown(page: Any) -> list[tuple[str, str]]:
    return [
        tuple(item)
        for item in page.evaluate(
            "() => Array.from(document.querySelectorAll('#job-log li[data-id]'))"
            ".map(li => [li.querySelector('time').textContent, li.querySelector('.text').textContent])"
        )
    ]


def log_stored(job: UpgradeJob) -> list[tuple[str, str]]:
    return [
        (format_moment(entry.at), entry.text) for entry in JobMessage.objects.filter(job=job).order_by("id")
    ]


def press(page: Any, operation: str) -> None:
    """Press a backend page's operation button (accepting its confirmation) and wait for the next page."""
    with page.expect_navigation():
        page.locator(f'#backend-operations button[data-operation="{operation}"]').click()


def assert_fits(page: Any, base: str, url: str) -> None:
    open_admin(page, base, url)
    page_width, results = page.evaluate(
        "() => [document.documentElement.scrollWidth,"
        " Array.from(document.querySelectorAll('#changelist .results'))"
        ".map(r => [r.scrollWidth, r.clientWidth])]"
    )
    assert page_width <= WIDTH, (url, page_width)
    for scroll, client in results:
        assert scroll <= client, f"{url}: the list is {scroll} px wide in {client} px: columns are hidden"


@pytest.mark.django_db(transaction=True)
def test_the_console_shows_what_real_operations_left_and_operates_a_backend_live(
    browser: Any,  # noqa: F811 (the fixture)
    console: dict[str, Any],
    settings: Any,
    tmp_path: Path,
) -> None:
    get_user_model().objects.create_user("operator", password=PASSWORD, is_staff=True, is_superuser=True)
    shots = SCREENSHOTS if os.environ.get("PORTAL_SCREENSHOTS") else None
    demo: Backend = console["demo"]
    portal = Portal(tmp_path / "portal", "").start()
    try:
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        page.on("dialog", lambda dialog: dialog.accept())
        sign_in(page, portal.url)

        # --- the dashboard: each item there, each linking to its object -------------------------
        local = Node.local()
        deadline = time.monotonic() + 60
        while not Node.objects.get(pk=local.pk).online:  # the worker's first heartbeat
            assert time.monotonic() < deadline, "the worker never reported its node online"
            time.sleep(0.2)
        open_admin(page, portal.url)
        assert page.title() == "Operator's console | Backend Portal admin"
        assert page.inner_text("#site-name").strip() == "Backend Portal"
        upgrades = page.locator("#panel-upgrades")
        assert "cpu-demo" in upgrades.inner_text() and "tts-demo" in upgrades.inner_text()
        demo.refresh_from_db()
        assert demo.upgrade_reason and demo.upgrade_reason in upgrades.inner_text()
        assert href_of(page, '#panel-upgrades tr[data-backend="cpu-demo"] a') == (
            f"/admin/backends_app/backend/{demo.pk}/change/"
        )
        trouble = page.locator("#panel-trouble").inner_text()
        assert "broken-demo" in trouble and "failed" in trouble
        assert href_of(page, f'#panel-trouble [data-job-row="{console["failed"].pk}"] a') == (
            f"/admin/backends_app/upgradejob/{console['failed'].pk}/change/"
        )
        nodes = page.locator("#panel-nodes").inner_text()
        assert "1 of 2 online" in nodes and "test-node online" in nodes and "far-node offline" in nodes
        assert (
            href_of(page, "#last-check a") == f"/admin/backends_app/upgradejob/{console['check'].pk}/change/"
        )
        schedule = Schedule.objects.filter(name=SCHEDULE_NAME).first()
        if schedule is not None:
            assert href_of(page, "#next-check a") == f"/admin/django_q/schedule/{schedule.pk}/change/"
        galleries = page.locator("#panel-galleries").inner_text()
        assert "unreadable" in galleries and "does not exist" in galleries
        assert href_of(page, '#panel-galleries [data-gallery="unreadable"] a') == (
            f"/admin/backends_app/gallery/{console['unreadable'].pk}/change/"
        )
        with page.expect_navigation():
            page.click('#panel-upgrades tr[data-backend="cpu-demo"] a')
        assert page.url == f"{portal.url}/admin/backends_app/backend/{demo.pk}/change/"

        # --- the backend's page: upgrade with its button, watched live in the admin -------------
        assert (
            page.locator('#backend-operations button[data-operation="upgrade"]').inner_text()
            == "Upgrade to v2"
        )
        assert page.locator('#backend-operations button[data-operation="rollback"]').count() == 0
        press(page, "upgrade")
        job = UpgradeJob.objects.get(kind=JobKind.UPGRADE, backend=demo)
        assert page.url == f"{portal.url}/admin/backends_app/upgradejob/{job.pk}/change/"
        lines_at_load = len(log_shown(page))
        page.evaluate("window.sameDocument = true")
        seen = watch_progress(page, screenshot=None)
        moving = [value for value in seen if 0 < value < 100]
        assert len(moving) >= 3 and moving == sorted(moving), seen
        assert "Succeeded" in page.inner_text("#outcome")
        assert page.evaluate("window.sameDocument") is True
        job.refresh_from_db()
        assert job.status == JobStatus.SUCCEEDED and live_version(settings, "cpu-demo") == "v2"
        # The log came line by line with the server's times, and a reload shows the same lines.
        page.wait_for_function(f"document.querySelectorAll('#job-log li[data-id]').length >= {job.log_count}")
        live_lines = log_shown(page)
        assert live_lines == log_stored(job) and len(live_lines) > lines_at_load + 3, live_lines
        assert live_lines[-1][1] == "succeeded"
        page.reload()
        assert log_shown(page) == live_lines
        page.goto(f"{portal.url}/jobs/{job.pk}/")
        assert log_shown(page) == live_lines

        # --- roll back to the kept version; then no "rollback" forward, and the hold released ---
        open_admin(page, portal.url, f"/admin/backends_app/backend/{demo.pk}/change/")
        assert page.locator('#backend-operations button[data-operation="rollback"]').inner_text() == (
            "Roll back to v1 on test-node"
        )
        if shots:
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "admin-backend.png"), full_page=True)
        press(page, "rollback")
        rollback = UpgradeJob.objects.get(kind=JobKind.ROLLBACK, backend=demo)
        page.wait_for_selector("#outcome:not([hidden])", timeout=60_000)
        rollback.refresh_from_db()
        assert rollback.status == JobStatus.SUCCEEDED and live_version(settings, "cpu-demo") == "v1"
        open_admin(page, portal.url, f"/admin/backends_app/backend/{demo.pk}/change/")
        operations = page.inner_text("#backend-operations")
        assert page.locator('#backend-operations button[data-operation="rollback"]').count() == 0
        assert "rolling back would go forward" in operations
        assert "held" in page.inner_text(".field-status_now")
        press(page, "release-hold")
        assert "Released the hold on v2" in page.inner_text(".field-operator_log")
        entry = LogEntry.objects.filter(object_id=str(demo.pk)).order_by("-id").first()
        assert entry is not None and entry.user.username == "operator"
        assert f"rolled back by job {rollback.pk}" in entry.get_change_message()

        # --- the dashboard follows a running job live ------------------------------------------
        press(page, "upgrade")
        again = UpgradeJob.objects.filter(kind=JobKind.UPGRADE, backend=demo).latest("id")
        open_admin(page, portal.url)
        row = f'#panel-running [data-live-job="{again.pk}"]'
        page.wait_for_selector(row)
        page.evaluate("window.sameDocument = true")
        assert "#" + str(rollback.pk) in page.inner_text("#panel-trouble")  # the rollback is listed
        values: list[float] = []
        shot_taken = False
        deadline = time.monotonic() + 60
        while page.get_attribute(row, "data-live-status") != "succeeded":
            assert time.monotonic() < deadline, f"the dashboard never showed the end; progress seen: {values}"
            value = page.evaluate(f"document.querySelector('{row} progress').value")
            if not values or values[-1] != value:
                values.append(value)
            if shots and not shot_taken and 20 < value < 80:
                page.screenshot(path=str(shots / "admin-dashboard.png"), full_page=False)
                shot_taken = True
            page.wait_for_timeout(30)
        assert page.inner_text(f"{row} .live-status") == "succeeded"
        assert shot_taken or not shots, f"no progress between 20 and 80 % to photograph: {values}"
        assert len([v for v in values if 0 < v < 100]) >= 2, values
        assert page.evaluate("window.sameDocument") is True

        # --- every changelist fits 1400 px without hiding a column ------------------------------
        for url in CHANGELISTS:
            assert_fits(page, portal.url, url)
    except Exception:
        print(portal.log_tail())
        raise
    finally:
        portal.stop()


@pytest.mark.django_db(transaction=True)
def test_a_fan_outs_children_change_state_live_on_the_parents_admin_page(
    browser: Any,  # noqa: F811 (the fixture)
    registry: Any,
    proxy: ThrottlingProxy,
    gallery_factory: Any,
    tmp_path: Path,
) -> None:
    """Two worker nodes; the children run here, one after the other, as a worker would run them."""
    repo = registry.unique_repo()
    registry.push_image(image("v1"), repo=repo, tag="latest", version="v1")
    gallery_factory([{"name": "cpu-demo", "uri": f"{proxy.host}/{repo}:latest"}])
    backend = Backend.objects.lookup("cpu-demo")
    nodes = [
        Node.objects.create(
            name=name,
            backends_path=str(tmp_path / name / "backends"),
            state_path=str(tmp_path / name / "state"),
            queue=name,  # a cluster nobody runs in this test: the children wait for us
            last_heartbeat_at=timezone.now(),
        )
        for name in ("node-a", "node-b")
    ]
    install, _ = backend.fan_out(JobKind.INSTALL, nodes=nodes, requested_by="test")
    for child in install.children.order_by("id"):
        assert jobs.run(child.pk).status == JobStatus.SUCCEEDED
    assert InstalledVersion.objects.filter(backend=backend, state="current").count() == 2
    registry.push_image(big_image("v2"), repo=repo, tag="latest", version="v2")
    parent, created = backend.fan_out(JobKind.UPGRADE, requested_by="test")
    assert created
    children = list(parent.children.order_by("id"))
    get_user_model().objects.create_user("operator", password=PASSWORD, is_staff=True, is_superuser=True)
    portal = Portal(tmp_path / "portal", "").start()
    runner: threading.Thread | None = None
    try:
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        sign_in(page, portal.url)
        open_admin(page, portal.url, f"/admin/backends_app/upgradejob/{parent.pk}/change/")
        page.wait_for_function("window.jobLive && window.jobLive.connected")
        page.evaluate("window.sameDocument = true")

        def states() -> tuple[str, ...]:
            return tuple(
                page.evaluate(
                    "ids => ids.map(id => document.querySelector(`[data-child='${id}'] .child-status`)"
                    ".textContent)",
                    [child.pk for child in children],
                )
            )

        assert states() == ("queued", "queued")

        first_seen_done = threading.Event()

        def run_children() -> None:
            # The second node starts once the page has shown the first one's end: both moments are
            # then on the page, however fast the machine runs them.
            try:
                jobs.run(children[0].pk)
                first_seen_done.wait(timeout=60)
                jobs.run(children[1].pk)
            finally:
                connections.close_all()

        runner = threading.Thread(target=run_children)
        runner.start()
        seen = [states()]
        deadline = time.monotonic() + 90
        while not page.is_visible("#outcome"):
            assert time.monotonic() < deadline, f"the parent never ended on the page; seen {seen}"
            now = states()
            if now != seen[-1]:
                seen.append(now)
            if now == ("succeeded", "queued"):
                first_seen_done.set()
            page.wait_for_timeout(30)
        if states() != seen[-1]:
            seen.append(states())
        assert seen == [
            ("queued", "queued"),
            ("running", "queued"),
            ("succeeded", "queued"),
            ("succeeded", "running"),
            ("succeeded", "succeeded"),
        ], seen
        assert "Succeeded" in page.inner_text("#outcome")
        assert page.evaluate("window.sameDocument") is True
        parent.refresh_from_db()
        assert parent.status == JobStatus.SUCCEEDED
        for node in nodes:
            version = Path(node.backends_path, "cpu-demo", "lib", "version.txt").read_text()
            assert version == "v2", node.name
    except Exception:
        print(portal.log_tail())
        raise
    finally:
        if runner is not None:
            runner.join(timeout=120)
        portal.stop()
