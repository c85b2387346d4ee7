"""The admin as the operator's console, through Django's test client and Channels' communicator.

The dashboard (each item present and linking to its object), a backend's page (read-only fieldsets,
its installed versions and latest jobs, one button per operation the backend allows now, each
queueing its job and recorded in the admin log), a job's page in the admin (the job page's live
part, its log, a fan-out's children), the job log kept with the server's times, the changelists'
filters, and who may press what. The same in a real browser against real servers:
test_browser_admin.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.models import Schedule

from backends_app import live
from backends_app.models import (
    Backend,
    Gallery,
    InstalledVersion,
    JobKind,
    JobMessage,
    JobPhase,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)
from backends_app.schedule import SCHEDULE_NAME
from backends_app.templatetags.portal_format import format_moment, format_size
from tests.test_pages import websocket

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

BACKENDS = "/admin/backends_app/backend/"
JOBS = "/admin/backends_app/upgradejob/"
DIGEST = {version: "sha256:" + str(index) * 64 for index, version in enumerate(["v0", "v1", "v2", "v3"])}


def page_of(backend: Backend) -> str:
    return f"{BACKENDS}{backend.pk}/change/"


def job_page_of(job: UpgradeJob) -> str:
    return f"{JOBS}{job.pk}/change/"


def operate(client: Client, backend: Backend, operation: str, **form: Any) -> Any:
    return client.post(f"{BACKENDS}{backend.pk}/operate/{operation}/", form)


def put(
    backend: Backend,
    version: str,
    *,
    node: Node | None = None,
    state: str = InstalledVersion.State.CURRENT,
    days_ago: int = 0,
    label: str = "",
    origin: str = InstalledVersion.Origin.GALLERY,
) -> InstalledVersion:
    """The row the procedure records for a version on a node's disk; a kept one's `label` sorts as the
    procedure's kept directories do (by when they were kept)."""
    node = node or Node.local()
    where = f"{node.backends_path}/{backend.name}"
    if state == InstalledVersion.State.KEPT:
        where = f"{node.state_path}/kept/{backend.name}/{label}"
    return InstalledVersion.objects.create(
        node=node,
        backend=backend,
        name=backend.name,
        state=state,
        version=version,
        digest=DIGEST[version],
        installed_at=timezone.now() - dt.timedelta(days=days_ago),
        path=where,
        origin=origin,
    )


def fresh(backend: Backend) -> Backend:
    return Backend.objects.with_installations().get(pk=backend.pk)


def buttons(html: str) -> dict[str, str]:
    """The operation buttons on a backend's page: `operation[:node]` -> what the button says."""
    found = {}
    for match in re.finditer(
        r'data-operation="([^"]+)"(?: data-node="([^"]+)")?[^>]*>([^<]+)</button>', html
    ):
        operation, node, label = match.groups()
        found[f"{operation}:{node}" if node else operation] = label.strip()
    return found


@pytest.fixture
def alpha(gallery_factory: Any) -> Backend:
    """`alpha` in gallery `test`: v1 live on the local node (installed a day ago), v0 kept."""
    gallery_factory(
        [
            {
                "name": "alpha",
                "uri": "127.0.0.1:9/demo/alpha:latest",
                "version": "v2",
                "tags": ["LLM", "text-to-text"],
                "license": "MIT",
            },
            {"name": "alpha-meta", "capabilities": {"default": "alpha", "nvidia": "alpha-cuda"}},
            {"name": "omega", "uri": "127.0.0.1:9/demo/omega:latest", "tags": ["audio-to-text"]},
        ]
    )
    backend = Backend.objects.get(name="alpha")
    put(backend, "v1", days_ago=1)
    put(backend, "v0", state=InstalledVersion.State.KEPT, days_ago=30, label="20250101T000000-job1")
    return backend


def flag(backend: Backend, version: str = "v2", reason: str = "version v1 -> v2 in the gallery") -> None:
    Backend.objects.filter(pk=backend.pk).update(
        upgrade_available=True,
        available_version=version,
        latest_digest=DIGEST[version],
        upgrade_reason=reason,
        last_checked_at=timezone.now(),
    )


def operator(name: str = "operator", *, perms: tuple[str, ...] = ("operate_backend",)) -> Client:
    user = get_user_model().objects.create_user(name, password="pw", is_staff=True)
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(user)
    return client


# --- the site and its dashboard ---------------------------------------------------------------------


def test_the_admin_is_the_portals_own_site(admin_client: Client) -> None:
    page = admin_client.get("/admin/").content.decode()

    assert "<title>Operator&#x27;s console | Backend Portal admin</title>" in page
    assert 'id="site-name"' in page and "Backend Portal</a>" in page
    assert "Django administration" not in page
    assert '<link rel="icon" href="/static/portal/favicon.svg"' in page
    assert 'id="console"' in page


def test_the_dashboard_shows_what_needs_an_operator_each_item_linking_to_its_object(
    admin_client: Client, alpha: Backend
) -> None:
    now = timezone.now()
    flag(alpha)
    omega = Backend.objects.get(name="omega")
    put(omega, "v1")
    omega.hold(version="v2", digest=DIGEST["v2"], reason="health check failed: exit 3")
    local = Node.local()
    local.heartbeat()
    far = Node.objects.create(name="far-node", backends_path="/srv/far", queue="far-node")
    running = UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=omega, node=local, requested_by="t")
    running.start()
    running.set_progress(1, 4, "layer 1/4")
    failed = UpgradeJob.objects.create(kind=JobKind.INSTALL, backend=alpha, node=far, requested_by="t")
    failed.start()
    failed.fail("no space left on device")
    rolled = UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=alpha, node=local, requested_by="t")
    rolled.start()
    rolled.fail("health check failed, previous version restored", status=JobStatus.ROLLED_BACK)
    by_hand = UpgradeJob.objects.create(kind=JobKind.ROLLBACK, backend=alpha, node=local, requested_by="t")
    by_hand.start()
    by_hand.finish("alpha rolled back to v0")
    old = UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=alpha, node=local, requested_by="t")
    old.fail("long ago")
    UpgradeJob.objects.filter(pk=old.pk).update(created_at=now - dt.timedelta(days=8))
    check = UpgradeJob.objects.create(kind=JobKind.CHECK, requested_by="scheduler")
    check.start()
    check.finish("checked 2 backends: 1 upgrade available")
    check.refresh_from_db()
    # As jobs.run_check records every check that ends.
    PortalSettings.record_check(finished_at=check.finished_at, requested_by="scheduler")
    next_run = now + dt.timedelta(hours=3)
    schedule, _ = Schedule.objects.update_or_create(
        name=SCHEDULE_NAME,
        defaults={"func": "backends_app.tasks.scheduled_check", "schedule_type": "I", "next_run": next_run},
    )
    broken = Gallery.objects.create(name="broken", url="file:///nowhere/index.yaml")
    broken.sync()

    page = admin_client.get("/admin/").content.decode()

    def panel(name: str) -> str:
        match = re.search(rf'<section class="panel" id="panel-{name}">(.*?)</section>', page, re.S)
        assert match, f"no {name} panel"
        return match.group(1)

    upgrades = panel("upgrades")
    assert f'<a href="{page_of(alpha)}">alpha</a>' in upgrades
    assert "version v1 -&gt; v2 in the gallery" in upgrades and "omega" not in upgrades
    held = panel("held")
    assert f'<a href="{page_of(omega)}">omega</a>' in held
    assert "held</span>" in held and "v2: health check failed: exit 3" in held
    jobs = panel("running")
    assert f'data-live-job="{running.pk}"' in jobs and f'href="{job_page_of(running)}"' in jobs
    assert 'value="25.0"' in jobs
    trouble = panel("trouble")
    for job in (failed, rolled, by_hand):
        assert f'href="{job_page_of(job)}"' in trouble
    assert job_page_of(old) not in trouble and job_page_of(running) not in trouble
    assert "no space left on device" in trouble and "rolled back" in trouble
    nodes = panel("nodes")
    assert "1 of 2 online" in nodes
    assert f'<a href="/admin/backends_app/node/{local.pk}/change/">test-node</a>' in nodes
    assert 'far-node</a>\n        <span class="state state-offline">offline' in nodes
    checks = panel("checks")
    assert f'<a href="{job_page_of(check)}">{format_moment(check.finished_at)}</a>' in checks
    assert f'href="/admin/django_q/schedule/{schedule.pk}/change/">{format_moment(next_run)}</a>' in checks
    galleries = panel("galleries")
    assert f'<a href="/admin/backends_app/gallery/{broken.pk}/change/">broken</a>' in galleries
    assert "does not exist" in galleries
    # Every link on the dashboard opens, and the lists it links to show what it says.
    for href in set(re.findall(r'href="(/admin/[^"]+)"', page)):
        assert admin_client.get(href.replace("&amp;", "&"), follow=True).status_code == 200, href
    all_failed = re.search(r'href="([^"]+)">All failed jobs', page)
    assert all_failed
    failures = admin_client.get(all_failed.group(1))
    assert {job.pk for job in failures.context["cl"].result_list} == {failed.pk, rolled.pk, old.pk}


def test_the_dashboard_costs_a_fixed_number_of_queries(admin_client: Client, alpha: Backend) -> None:
    def populate(count: int) -> None:
        for index in range(count):
            node = Node.objects.create(name=f"node-{index}-{Node.objects.count()}", backends_path="/srv/x")
            put(alpha, "v1", node=node)
            for status in (JobStatus.RUNNING, JobStatus.FAILED):
                UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=alpha, node=node, status=status)
        flag(alpha)

    populate(1)
    admin_client.get("/admin/")
    with CaptureQueriesContext(connection) as one:
        admin_client.get("/admin/")
    populate(8)
    with CaptureQueriesContext(connection) as many:
        response = admin_client.get("/admin/")
    assert response.status_code == 200
    assert len(many) <= len(one), [query["sql"] for query in many]


def test_staff_without_permissions_see_no_panel_they_may_not_read(alpha: Backend) -> None:
    flag(alpha)
    page = operator("looker", perms=()).get("/admin/").content.decode()
    assert 'id="console"' in page
    assert "panel-upgrades" not in page and "panel-running" not in page and "alpha" not in page
    assert "console-check-now" not in page


# --- a backend's page ---------------------------------------------------------------------------------


def test_the_backend_page_says_what_it_is_what_runs_and_what_is_offered_readably(
    admin_client: Client, alpha: Backend
) -> None:
    flag(alpha)
    job = UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=alpha, node=Node.local(), requested_by="t")
    meta = Backend.objects.get(name="alpha-meta")

    page = admin_client.get(page_of(alpha)).content.decode()
    meta_page = admin_client.get(page_of(meta)).content.decode()

    for heading in ("What it is", "What runs", "What the registry offers", "Policy"):
        assert f">{heading}</h2>" in page, heading
    assert "test@alpha" in page
    assert '<span class="tag">LLM</span> <span class="tag">text-to-text</span>' in page
    entry = re.search(r'<pre class="entry">(.*?)</pre>', page, re.S)
    assert entry and "name: alpha\n" in entry.group(1) and "tags:\n- LLM\n- text-to-text\n" in entry.group(1)
    assert "upgrade available</strong> <small>version v1 -&gt; v2 in the gallery</small>" in page
    assert "<th>default</th><td>alpha</td>" in meta_page and "<th>nvidia</th><td>alpha-cuda</td>" in meta_page
    assert "meta: on this portal's node it means <a href=\"" in meta_page
    # The installed version per node, with what is kept there, and the latest jobs.
    assert "installed versions, per node" in page.lower()
    assert 'v0 <span class="quiet">installed' in page
    assert f'<a href="{job_page_of(job)}">#{job.pk}</a>' in page
    # Nothing is a text box: the gallery writes the entry, the check the rest, buttons the policy.
    for field in ("held_version", "held_digest", "held_reason", "capabilities", "tags", "entry", "pinned"):
        assert f'name="{field}"' not in page, field


def test_a_hold_cannot_be_edited_through_the_form(admin_client: Client, alpha: Backend) -> None:
    alpha.hold(version="v2", digest=DIGEST["v2"], reason="rolled back by job 7")
    response = admin_client.post(
        page_of(alpha), {"held_version": "", "held_digest": "", "held_reason": "", "pinned": "on"}
    )
    assert response.status_code == 403
    alpha.refresh_from_db()
    assert (alpha.held_version, alpha.held_reason, alpha.pinned) == ("v2", "rolled back by job 7", False)


def test_the_buttons_are_the_operations_the_backend_allows_now_and_say_where_they_go(
    admin_client: Client, alpha: Backend
) -> None:
    local = Node.local()
    omega = Backend.objects.get(name="omega")

    assert buttons(admin_client.get(page_of(omega)).content.decode()) == {
        "check": "Check for upgrades (every installed backend)",
        "install": "Install the latest build",
        "pin": "Pin (no automatic upgrades)",
    }
    assert buttons(admin_client.get(page_of(alpha)).content.decode()) == {
        "check": "Check for upgrades (every installed backend)",
        "upgrade": "Reinstall (pull the image again)",
        f"rollback:{local.name}": f"Roll back to v0 on {local.name}",
        "pin": "Pin (no automatic upgrades)",
    }
    flag(alpha)
    assert buttons(admin_client.get(page_of(alpha)).content.decode())["upgrade"] == "Upgrade to v2"
    alpha.pin()
    pinned = admin_client.get(page_of(alpha)).content.decode()
    assert "upgrade" not in buttons(pinned) and buttons(pinned)["unpin"] == "Unpin"
    assert "Pinned: unpin it to upgrade." in pinned
    # Another node running another build: converge; a rollback button per node with a kept version.
    gpu = Node.objects.create(name="gpu-box", backends_path="/srv/gpu", state_path="/srv/gpu-state")
    put(alpha, "v2", node=gpu)
    put(alpha, "v1", node=gpu, state=InstalledVersion.State.KEPT, days_ago=2, label="20250301T000000-job5")
    found = buttons(admin_client.get(page_of(alpha)).content.decode())
    assert found["converge"] == "Converge (upgrade the nodes that run another build)"
    assert found["rollback:gpu-box"] == "Roll back to v1 on gpu-box"


def test_after_a_rollback_no_button_rolls_forward_and_the_hold_can_be_released(
    admin_client: Client, alpha: Backend
) -> None:
    """Rolled back from v2 to v1, pinned, v2 offered and held: the kept v2 is where a "rollback"
    would go, which is forward, so none is offered; the page says why."""
    InstalledVersion.objects.filter(backend=alpha).delete()
    put(alpha, "v1", days_ago=10, origin=InstalledVersion.Origin.ROLLBACK)
    put(alpha, "v2", state=InstalledVersion.State.KEPT, days_ago=1, label="20250301T000000-job9")
    flag(alpha)
    alpha.pin()
    alpha.hold(version="v2", digest=DIGEST["v2"], reason="rolled back by job 9")

    page = admin_client.get(page_of(alpha)).content.decode()
    response = operate(admin_client, alpha, "rollback", node=Node.local().pk)

    assert set(buttons(page)) == {"check", "unpin", "release-hold"}
    assert buttons(page)["release-hold"] == "Release the hold on v2"
    assert "the version kept last is the one a rollback replaced (v2); rolling back would go forward" in page
    assert "held</strong> <small>v2: rolled back by job 9</small>" in page
    assert response.status_code == 302 and response["Location"] == page_of(alpha)
    assert not UpgradeJob.objects.exists()


@pytest.mark.parametrize(
    ("operation", "kind", "form"),
    [
        ("upgrade", JobKind.UPGRADE, {}),
        ("rollback", JobKind.ROLLBACK, {"node": "local"}),
        ("check", JobKind.CHECK, {}),
    ],
)
def test_a_button_queues_its_job_records_who_asked_and_goes_to_the_job(
    admin_client: Client, alpha: Backend, operation: str, kind: str, form: dict[str, Any]
) -> None:
    flag(alpha)
    if form.get("node") == "local":
        form = {"node": Node.local().pk}

    response = operate(admin_client, alpha, operation, **form)

    job = UpgradeJob.objects.get()
    assert (job.kind, job.status, job.requested_by) == (kind, JobStatus.QUEUED, "admin:admin")
    if kind != JobKind.CHECK:
        assert (job.backend, job.node) == (alpha, Node.local())
    assert response.status_code == 302 and response["Location"] == job_page_of(job)
    entry = LogEntry.objects.get(object_id=str(alpha.pk))
    assert entry.user.username == "admin" and f"queued as job #{job.pk}" in entry.get_change_message()
    # Pressed again while it is queued: the same job, nothing new.
    again = operate(admin_client, alpha, operation, **form)
    assert UpgradeJob.objects.count() == 1 and again["Location"] == job_page_of(job)


def test_install_and_converge_buttons_queue_their_jobs(admin_client: Client, alpha: Backend) -> None:
    omega = Backend.objects.get(name="omega")
    install = operate(admin_client, omega, "install")
    job = UpgradeJob.objects.get(backend=omega)
    assert (job.kind, job.node) == (JobKind.INSTALL, Node.local())
    assert install["Location"] == job_page_of(job)

    gpu = Node.objects.create(name="gpu-box", backends_path="/srv/gpu")
    put(alpha, "v2", node=gpu)
    converge = operate(admin_client, alpha, "converge")
    parent = UpgradeJob.objects.get(backend=alpha, parent=None)
    assert [(child.node.name, child.kind) for child in parent.children.all()] == [("test-node", "upgrade")]
    assert converge["Location"] == job_page_of(parent)


def test_an_operation_the_backend_does_not_allow_now_queues_nothing(
    admin_client: Client, alpha: Backend
) -> None:
    alpha.pin()
    omega = Backend.objects.get(name="omega")
    said = [
        operate(admin_client, alpha, "upgrade"),
        operate(admin_client, alpha, "install"),
        operate(admin_client, omega, "rollback", node=Node.local().pk),
        operate(admin_client, alpha, "release-hold"),
        operate(admin_client, alpha, "pin"),
    ]
    assert [response.status_code for response in said] == [302] * 5
    assert operate(admin_client, alpha, "no-such-thing").status_code == 404
    assert admin_client.get(f"{BACKENDS}{alpha.pk}/operate/unpin/").status_code == 405
    assert not UpgradeJob.objects.exists() and not LogEntry.objects.exists()
    followed = admin_client.post(f"{BACKENDS}{alpha.pk}/operate/upgrade/", follow=True).content.decode()
    assert "Nothing done: alpha does not allow upgrade now (Pinned: unpin it to upgrade.)." in followed


def test_pin_unpin_and_release_hold_are_recorded_who_when_what_and_why(
    admin_client: Client, alpha: Backend
) -> None:
    alpha.hold(version="v2", digest=DIGEST["v2"], reason="health check failed: exit 3")

    operate(admin_client, alpha, "pin")
    operate(admin_client, alpha, "release-hold")
    operate(admin_client, alpha, "unpin")

    alpha.refresh_from_db()
    assert (alpha.pinned, alpha.held_version, alpha.held_digest, alpha.held_reason) == (False, "", "", "")
    entries = list(LogEntry.objects.filter(object_id=str(alpha.pk)).order_by("id"))
    assert [entry.get_change_message() for entry in entries] == [
        "Pinned: no automatic upgrades.",
        f"Released the hold on v2 ({DIGEST['v2']}), held because: health check failed: exit 3",
        "Unpinned.",
    ]
    assert {entry.user.username for entry in entries} == {"admin"}
    page = admin_client.get(page_of(alpha)).content.decode()
    assert f"<time>{format_moment(entries[1].action_time)}</time> admin: Released the hold on v2" in page
    history = admin_client.get(f"{page_of(alpha).removesuffix('change/')}history/").content.decode()
    assert "Released the hold on v2" in history


# --- who may press what -------------------------------------------------------------------------------


OPERATIONS = [
    ("check", {}),
    ("install", {}),
    ("upgrade", {}),
    ("rollback", {"node": "local"}),
    ("converge", {}),
    ("pin", {}),
    ("unpin", {}),
    ("release-hold", {}),
]


@pytest.mark.parametrize(("operation", "form"), OPERATIONS)
def test_without_the_operate_permission_no_button_shows_and_pressing_one_is_refused(
    alpha: Backend, operation: str, form: dict[str, Any]
) -> None:
    """A staff user who may look at backends (Django's view permission) but not operate them."""
    flag(alpha)
    if operation == "release-hold":
        alpha.hold(version="v3", digest=DIGEST["v3"], reason="marked bad")
    Node.objects.create(name="gpu-box", backends_path="/srv/gpu")
    put(Backend.objects.get(name="alpha"), "v2", node=Node.objects.get(name="gpu-box"))
    target = Backend.objects.get(name="omega") if operation == "install" else alpha
    if operation == "unpin":
        alpha.pin()
    if form.get("node") == "local":
        form = {"node": Node.local().pk}
    looker = operator("looker", perms=("view_backend", "view_upgradejob"))
    before = (
        list(Backend.objects.order_by("pk").values_list("pinned", "held_version", "updated_at")),
        UpgradeJob.objects.count(),
    )

    page = looker.get(page_of(target))
    response = operate(looker, target, operation, **form)

    assert page.status_code == 200
    assert 'id="backend-operations"' not in page.content.decode()
    assert "data-operation" not in page.content.decode()
    assert response.status_code == 403
    after = (
        list(Backend.objects.order_by("pk").values_list("pinned", "held_version", "updated_at")),
        UpgradeJob.objects.count(),
    )
    assert after == before and not LogEntry.objects.exists()
    # The same user with the permission sees the button and may press it.
    looker_user = get_user_model().objects.get(username="looker")
    looker_user.user_permissions.add(Permission.objects.get(codename="operate_backend"))
    allowed = Client()
    allowed.force_login(looker_user)
    assert operation in {key.split(":")[0] for key in buttons(allowed.get(page_of(target)).content.decode())}


def test_without_the_operate_permission_a_job_cannot_be_cancelled_from_the_admin(alpha: Backend) -> None:
    job = UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=alpha, node=Node.local())
    looker = operator("looker", perms=("view_upgradejob",))
    page = looker.get(job_page_of(job)).content.decode()
    assert 'id="job-card"' in page and 'id="cancel-form"' not in page
    assert looker.post(f"{JOBS}{job.pk}/cancel/").status_code == 403
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED

    allowed = operator()
    assert 'id="cancel-form"' in allowed.get(job_page_of(job)).content.decode()
    response = allowed.post(f"{JOBS}{job.pk}/cancel/")
    job.refresh_from_db()
    assert response["Location"] == job_page_of(job)
    assert (job.status, job.message) == (JobStatus.CANCELLED, "cancelled by admin:operator")
    assert LogEntry.objects.get(object_id=str(job.pk)).get_change_message() == "Cancel requested."


# --- a job in the admin --------------------------------------------------------------------------------


def test_the_admin_job_view_shows_the_live_part_its_log_and_a_fan_outs_children(
    admin_client: Client, alpha: Backend
) -> None:
    gpu = Node.objects.create(name="gpu-box", backends_path="/srv/gpu", queue="gpu-box")
    put(alpha, "v1", node=gpu)
    parent, created = alpha.fan_out(JobKind.UPGRADE, requested_by="admin:admin")
    assert created
    first, second = parent.children.order_by("id")
    first.start()
    first.set_phase(JobPhase.DOWNLOADING, "downloading alpha")
    first.set_progress(3 * 1024 * 1024, 4 * 1024 * 1024, "layer 1/1")

    page = admin_client.get(job_page_of(parent)).content.decode()
    child_page = admin_client.get(job_page_of(first)).content.decode()
    public = admin_client.get(f"/jobs/{parent.pk}/").content.decode()

    assert 'id="job-card"' in page and '<script src="/static/portal/job.js" defer></script>' in page
    for child, status in ((first, "running"), (second, "queued")):
        row = re.search(rf'<li data-child="{child.pk}">.*?</li>', page, re.S)
        assert row, child
        assert f'href="{job_page_of(child)}"' in row.group(0)
        assert f'status-{status} child-status">{status}<' in row.group(0)
        assert f'href="/jobs/{child.pk}/"' in public  # the job page links to the job pages
    assert "3.0\xa0MiB of 4.0\xa0MiB" in child_page
    for text in ("running", "downloading alpha", "layer 1/1"):
        assert f'<span class="text">{text}</span>' in child_page
    assert f'href="{job_page_of(parent)}">job #{parent.pk}</a>' in child_page


# --- the job log -------------------------------------------------------------------------------------


def log_lines(page: str) -> list[tuple[str, str]]:
    """(time as shown, text) of each line of a job page's log, in order."""
    log = re.search(r'<ol class="log" id="job-log".*?</ol>', page, re.S)
    assert log, "no log"
    line = r'<time datetime="[^"]+">([^<]+)</time> <span class="text">([^<]*)</span>'
    return re.findall(line, log.group(0))


def test_a_jobs_messages_are_kept_with_the_servers_times_and_shown_after_a_reload(
    admin_client: Client, alpha: Backend
) -> None:
    """Today's page would show one line, the last message, stamped with the browser's clock."""
    job = UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=alpha, node=Node.local(), requested_by="t")
    before = timezone.now()
    job.start()
    job.set_phase(JobPhase.RESOLVING, "resolving 127.0.0.1:9/demo/alpha:latest")
    job.set_phase(JobPhase.DOWNLOADING, "downloading 127.0.0.1:9/demo/alpha:latest")
    for layer in (1, 2):
        job.set_progress(layer, 2, f"layer {layer}/2")
        job.set_progress(layer, 2, f"layer {layer}/2")  # the same message twice is one line
    job.set_phase(JobPhase.HEALTH_CHECK, "checking alpha")
    job.fail("health check failed, previous version restored: exit 3", status=JobStatus.ROLLED_BACK)
    after = timezone.now()

    expected = [
        "running",
        "resolving 127.0.0.1:9/demo/alpha:latest",
        "downloading 127.0.0.1:9/demo/alpha:latest",
        "layer 1/2",
        "layer 2/2",
        "checking alpha",
        "health check failed, previous version restored: exit 3",
        "rolled back",
    ]
    stamps = list(JobMessage.objects.filter(job=job).order_by("id").values_list("at", flat=True))
    assert all(before <= stamp <= after for stamp in stamps) and stamps == sorted(stamps)
    shown = [format_moment(stamp) for stamp in stamps]
    for url in (f"/jobs/{job.pk}/", job_page_of(job)):
        lines = log_lines(admin_client.get(url).content.decode())
        assert [text for _, text in lines] == expected, url
        assert [when for when, _ in lines] == shown, url


def test_the_log_is_bounded_keeping_the_first_lines_and_the_latest(
    admin_client: Client, alpha: Backend
) -> None:
    job = UpgradeJob.objects.create(kind=JobKind.CHECK, requested_by="t")
    job.start()
    for done in range(1, 501):
        job.set_progress(done, 500, f"checked {done} of 500 backends")

    kept = list(JobMessage.objects.filter(job=job).order_by("id").values_list("text", flat=True))
    job.refresh_from_db()

    assert len(kept) == JobMessage.LIMIT and job.log_count == 501
    assert kept[0] == "running"
    assert kept[JobMessage.HEAD - 1] == f"checked {JobMessage.HEAD - 1} of 500 backends"
    assert kept[JobMessage.HEAD] == f"checked {501 - JobMessage.LIMIT + JobMessage.HEAD} of 500 backends"
    assert kept[-1] == "checked 500 of 500 backends"
    page = admin_client.get(f"/jobs/{job.pk}/").content.decode()
    assert f"… {501 - JobMessage.LIMIT} messages in between not kept" in page


# --- live: the log and the children over the websocket ------------------------------------------------


@pytest.fixture
def session(admin_user: Any, client: Client) -> str:
    client.force_login(admin_user)
    return client.cookies["sessionid"].value


@pytest.mark.django_db(transaction=True)
def test_the_socket_sends_the_log_lines_with_server_times_once_each(alpha: Backend, session: str) -> None:
    job = UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=alpha, node=Node.local(), requested_by="t")
    job.start()
    job.set_phase(JobPhase.DOWNLOADING, "downloading alpha")

    async def follow() -> list[dict[str, Any]]:
        communicator = websocket(f"/ws/jobs/{job.pk}/", session=session)
        connected, _ = await communicator.connect()
        assert connected
        seen = [await communicator.receive_json_from(timeout=5)]
        await in_a_worker_thread(lambda: job.set_progress(1, 2, "layer 1/1"))
        seen.append(await communicator.receive_json_from(timeout=5))
        await in_a_worker_thread(lambda: job.set_progress(2, 2, "layer 1/1"))  # no new line
        seen.append(await communicator.receive_json_from(timeout=5))
        await in_a_worker_thread(lambda: job.finish("alpha v2 installed"))
        seen.append(await communicator.receive_json_from(timeout=5))
        await communicator.disconnect()
        return seen

    first, line, progress, final = async_to_sync(follow)()

    stored = {entry.pk: entry for entry in JobMessage.objects.filter(job=job)}
    assert [entry["text"] for entry in first["log"]] == ["running", "downloading alpha"]
    assert [entry["text"] for entry in line["log"]] == ["layer 1/1"] and progress["log"] == []
    assert [entry["text"] for entry in final["log"]] == ["alpha v2 installed", "succeeded"]
    for entry in first["log"] + line["log"] + final["log"]:
        assert entry["at_display"] == format_moment(stored[entry["id"]].at)
    assert final["log_count"] == 5


def in_a_worker_thread(step: Any) -> Any:
    """Run `step` as a worker's thread would, then close that thread's database connection."""

    def run() -> Any:
        try:
            return step()
        finally:
            connection.close()

    return asyncio.get_running_loop().run_in_executor(None, run)


def fan_out_with_two_nodes(alpha: Backend) -> UpgradeJob:
    gpu = Node.objects.create(name="gpu-box", backends_path="/srv/gpu", queue="gpu-box")
    Node.objects.filter(pk=Node.local().pk).update(queue="test-node")
    put(alpha, "v1", node=gpu)
    parent, _ = alpha.fan_out(JobKind.UPGRADE, requested_by="t")
    return parent


def follow_children(parent: UpgradeJob, session: str) -> list[dict[str, Any]]:
    """Connect to the parent's socket, then drive each child as a worker would; collect what the
    parent's page receives until it ends."""
    first, second = parent.children.order_by("id")

    async def follow() -> list[dict[str, Any]]:
        communicator = websocket(f"/ws/jobs/{parent.pk}/", session=session)
        connected, _ = await communicator.connect()
        assert connected
        seen = [await communicator.receive_json_from(timeout=5)]
        for step in (
            first.start,
            lambda: first.set_progress(1, 2, "layer 1/1"),
            lambda: first.finish("done on test-node"),
            second.start,
            lambda: second.fail("no space left on device"),
        ):
            await in_a_worker_thread(step)
            seen.append(await communicator.receive_json_from(timeout=5))
        while seen[-1]["active"]:
            seen.append(await communicator.receive_json_from(timeout=5))
        await communicator.disconnect()
        return seen

    return async_to_sync(follow)()


def children_states(state: dict[str, Any]) -> list[tuple[str, str, float]]:
    return [(child["node"], child["status"], child["percent"]) for child in state["children"]]


@pytest.mark.django_db(transaction=True)
def test_a_fan_outs_socket_carries_each_childs_change_as_it_happens(alpha: Backend, session: str) -> None:
    """The embedded shape: the consumer reads the parent and its children."""
    assert not live.cross_process_layer()
    parent = fan_out_with_two_nodes(alpha)

    seen = follow_children(parent, session)

    assert children_states(seen[0]) == [("gpu-box", "queued", 0.0), ("test-node", "queued", 0.0)] or (
        children_states(seen[0]) == [("test-node", "queued", 0.0), ("gpu-box", "queued", 0.0)]
    )
    steps = [sorted(children_states(state)) for state in seen[1:6]]
    first_node = parent.children.order_by("id").first().node.name  # type: ignore[union-attr]
    other = "gpu-box" if first_node == "test-node" else "test-node"
    assert steps == [
        sorted([(first_node, "running", 0.0), (other, "queued", 0.0)]),
        sorted([(first_node, "running", 50.0), (other, "queued", 0.0)]),
        sorted([(first_node, "succeeded", 100.0), (other, "queued", 0.0)]),
        sorted([(first_node, "succeeded", 100.0), (other, "running", 0.0)]),
        sorted([(first_node, "succeeded", 100.0), (other, "failed", 0.0)]),
    ]
    assert seen[-1]["status"] == JobStatus.PARTIAL and not seen[-1]["active"]


@pytest.mark.django_db(transaction=True)
def test_with_redis_a_childs_change_reaches_the_parents_page_without_waiting_for_a_poll(
    alpha: Backend, session: str, settings: Any, monkeypatch: Any
) -> None:
    from tests.test_browser import redis_url_or_skip

    url = redis_url_or_skip()
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [url]}}
    }
    monkeypatch.setattr(live, "RESYNC_SECONDS", 3600.0)  # only the published changes can arrive
    assert live.cross_process_layer()
    parent = fan_out_with_two_nodes(alpha)

    seen = follow_children(parent, session)

    statuses = [sorted(status for _, status, _ in children_states(state)) for state in seen[1:6]]
    assert statuses == [
        ["queued", "running"],
        ["queued", "running"],
        ["queued", "succeeded"],
        ["running", "succeeded"],
        ["failed", "succeeded"],
    ]
    assert seen[-1]["status"] == JobStatus.PARTIAL


# --- the lists ----------------------------------------------------------------------------------------


def test_backend_filters_narrow_the_list(admin_client: Client, alpha: Backend, gallery_factory: Any) -> None:
    flag(alpha)
    omega = Backend.objects.get(name="omega")
    omega.pin()
    put(omega, "v1")
    omega.hold(version="v2", digest=DIGEST["v2"], reason="bad")
    gallery_factory([{"name": "zeta", "uri": "127.0.0.1:9/demo/zeta:latest", "tags": ["LLM"]}], name="other")
    Backend.objects.filter(name="alpha-meta").update(gone=True)

    def names(query: str) -> set[str]:
        response = admin_client.get(f"{BACKENDS}?{query}")
        assert response.status_code == 200, query
        return {row.name for row in response.context["cl"].result_list}

    assert names(f"gallery__id__exact={Gallery.objects.get(name='other').pk}") == {"zeta"}
    assert names("kind=meta") == {"alpha-meta"}
    assert names("kind=concrete") == {"alpha", "omega", "zeta"}
    assert names("capability=nvidia") == {"alpha-meta"}
    assert names("tag=LLM") == {"alpha", "zeta"}
    assert names("tag=audio-to-text") == {"omega"}
    assert names("installed=yes") == {"alpha", "omega"}
    assert names("upgrade_available__exact=1") == {"alpha"}
    assert names("pinned__exact=1") == {"omega"}
    assert names("held=yes") == {"omega"} and names("held=no") == {"alpha", "alpha-meta", "zeta"}
    assert names("gone__exact=1") == {"alpha-meta"}
    page = admin_client.get(BACKENDS).content.decode()
    for title in ("meta or concrete", "capability", "tag", "held", "upgrade available", "gone"):
        assert f"By {title}" in page, title


def test_sizes_and_moments_read_the_same_everywhere(admin_client: Client, alpha: Backend) -> None:
    assert [format_size(value) for value in (0, 1023, 1024, 1536, 80 * 1024**2, 5 * 1024**3)] == [
        "0\xa0B",
        "1023\xa0B",
        "1.0\xa0KiB",
        "1.5\xa0KiB",
        "80.0\xa0MiB",
        "5.0\xa0GiB",
    ]
    moment = dt.datetime(2025, 6, 1, 14, 3, 5, tzinfo=dt.UTC)
    assert format_moment(moment) == "2025-06-01 14:03:05 UTC"
    Backend.objects.filter(pk=alpha.pk).update(last_checked_at=moment)
    job = UpgradeJob.objects.create(
        kind=JobKind.UPGRADE, backend=alpha, node=Node.local(), bytes_total=80 * 1024**2
    )
    UpgradeJob.objects.filter(pk=job.pk).update(created_at=moment)
    PortalSettings.load()

    backends = admin_client.get(BACKENDS).content.decode()
    jobs = admin_client.get(JOBS).content.decode()
    job_page = admin_client.get(f"/jobs/{job.pk}/").content.decode()
    admin_job = admin_client.get(job_page_of(job)).content.decode()

    assert "2025-06-01 14:03:05 UTC" in backends
    assert "2025-06-01 14:03:05 UTC" in jobs and "0% of 80.0\xa0MiB" in jobs
    for page in (job_page, admin_job):
        assert '<time datetime="2025-06-01T14:03:05+00:00">2025-06-01 14:03:05 UTC</time>' in page
    assert " MB" not in jobs + job_page and "p.m." not in backends + jobs + admin_job
