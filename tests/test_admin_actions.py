"""The Django admin: actions queue the right jobs (or say why not), and every changelist costs a fixed
number of queries however many rows it shows.

Queued jobs never run here: there is no django-q2 cluster, so a queued task just waits in the ORM
broker, where the tests find it.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.models import OrmQ

from backends_app.models import (
    Backend,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

BACKENDS_URL = "/admin/backends_app/backend/"
JOBS_URL = "/admin/backends_app/upgradejob/"


@pytest.fixture
def backends(gallery_factory: Any) -> dict[str, Backend]:
    """Three gallery backends; `alpha` and `beta` installed (v1) on the local node, `gamma` not."""
    gallery_factory(
        [{"name": name, "uri": f"127.0.0.1:9/demo/{name}:latest", "version": "v2"} for name in GALLERY_NAMES]
    )
    rows = {b.name: b for b in Backend.objects.all()}
    for name in ("alpha", "beta"):
        install_row(rows[name], "v1")
    return rows


GALLERY_NAMES = ("alpha", "beta", "gamma")


def install_row(
    backend: Backend,
    version: str,
    state: str = InstalledVersion.State.CURRENT,
    node: Node | None = None,
    digest: str = "sha256:" + "a" * 64,
) -> InstalledVersion:
    """The row the procedure records for a backend on disk (the admin reads only rows)."""
    node = node or Node.local()
    return InstalledVersion.objects.create(
        node=node,
        backend=backend,
        name=backend.name,
        state=state,
        version=version,
        digest=digest,
        installed_at=timezone.now(),
        path=f"{node.backends_path}/{backend.name}",
    )


def act(client: Any, action: str, selected: list[Any], url: str = BACKENDS_URL) -> Any:
    return client.post(url, {"action": action, "_selected_action": [obj.pk for obj in selected]}, follow=True)


def said(response: Any) -> str:
    return " | ".join(str(message) for message in response.context["messages"])


def queued_tasks() -> list[str]:
    """Names of the tasks waiting in django-q2's ORM broker."""
    return sorted(task.name() for task in OrmQ.objects.all())


def test_upgrade_selected_queues_one_upgrade_per_backend_and_says_how_many(
    admin_client: Any, backends: dict[str, Backend], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = act(admin_client, "upgrade_selected", [backends["alpha"], backends["beta"]])
    jobs = list(UpgradeJob.objects.order_by("id"))
    assert [(job.kind, job.backend.name, job.status) for job in jobs] == [
        (JobKind.UPGRADE, "alpha", JobStatus.QUEUED),
        (JobKind.UPGRADE, "beta", JobStatus.QUEUED),
    ]
    assert {job.requested_by for job in jobs} == {"admin:admin"}
    assert {job.node for job in jobs} == {Node.local()}
    assert {job.from_version for job in jobs} == {"v1"}
    assert "Queued 2 upgrade job(s)" in said(response)
    assert f'href="/jobs/{jobs[0].pk}/"' in said(response)
    assert queued_tasks() == [f"job-{jobs[0].pk}", f"job-{jobs[1].pk}"]


def test_upgrade_refuses_a_pinned_backend_and_says_why(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    backends["alpha"].pin()
    response = act(admin_client, "upgrade_selected", [backends["alpha"], backends["beta"]])
    assert list(UpgradeJob.objects.values_list("backend__name", flat=True)) == ["beta"]
    assert "Queued 1 upgrade job(s)" in said(response)
    assert "alpha is pinned" in said(response)


def test_upgrade_of_a_busy_backend_names_the_job_already_there(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    running, _ = backends["alpha"].request(JobKind.UPGRADE, requested_by="someone", queue=False)
    UpgradeJob.objects.filter(pk=running.pk).update(status=JobStatus.RUNNING)
    queued, _ = backends["beta"].request(JobKind.UPGRADE, requested_by="someone", queue=False)
    response = act(admin_client, "upgrade_selected", [backends["alpha"], backends["beta"]])
    assert UpgradeJob.objects.count() == 2
    text = said(response)
    assert "No upgrade job queued" in text
    assert f'alpha: already running as job <a href="/jobs/{running.pk}/">#{running.pk}</a>' in text
    assert f'beta: already queued as job <a href="/jobs/{queued.pk}/">#{queued.pk}</a>' in text


def test_upgrade_of_a_backend_not_installed_is_refused(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    response = act(admin_client, "upgrade_selected", [backends["gamma"]])
    assert not UpgradeJob.objects.exists()
    assert "gamma is not installed" in said(response)


def test_rollback_selected_needs_a_kept_version(admin_client: Any, backends: dict[str, Backend]) -> None:
    install_row(backends["alpha"], "v0", state=InstalledVersion.State.KEPT)
    response = act(admin_client, "rollback_selected", [backends["alpha"], backends["beta"]])
    assert list(UpgradeJob.objects.values_list("kind", "backend__name")) == [(JobKind.ROLLBACK, "alpha")]
    assert "Queued 1 rollback job(s)" in said(response)
    assert "beta has no kept version" in said(response)


def test_install_selected_queues_an_install(admin_client: Any, backends: dict[str, Backend]) -> None:
    response = act(admin_client, "install_selected", [backends["gamma"]])
    job = UpgradeJob.objects.get()
    assert (job.kind, job.backend.name, job.from_version) == (JobKind.INSTALL, "gamma", "")
    assert "Queued 1 install job(s)" in said(response)


def test_converge_upgrades_the_nodes_that_run_another_build(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    other = Node.objects.create(name="gpu-box", backends_path="/srv/backends")
    install_row(backends["alpha"], "v2", node=other, digest="sha256:" + "b" * 64)  # the newest build
    page = admin_client.get(BACKENDS_URL).content.decode()
    assert "drift</strong>" in page
    response = act(admin_client, "converge_selected", [backends["alpha"], backends["beta"]])
    parent = UpgradeJob.objects.get(parent=None)
    assert (parent.kind, parent.backend.name, parent.node) == (JobKind.UPGRADE, "alpha", None)
    assert [(child.node.name, child.from_version) for child in parent.children.all()] == [("test-node", "v1")]
    assert "Queued 1 converge job(s)" in said(response)
    assert "every node runs the same build of beta" in said(response)


def test_pin_and_unpin_change_the_backends(admin_client: Any, backends: dict[str, Backend]) -> None:
    response = act(admin_client, "pin_selected", [backends["alpha"], backends["gamma"]])
    assert set(Backend.objects.filter(pinned=True).values_list("name", flat=True)) == {"alpha", "gamma"}
    assert "Pinned 2 backend(s)" in said(response)
    response = act(admin_client, "unpin_selected", [backends["alpha"]])
    assert set(Backend.objects.filter(pinned=True).values_list("name", flat=True)) == {"gamma"}
    assert "Unpinned 1 backend(s)" in said(response)


def test_check_now_queues_one_check_then_names_it(
    admin_client: Any, backends: dict[str, Backend], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        first = act(admin_client, "check_now", [backends["alpha"]])
    check = UpgradeJob.objects.get(kind=JobKind.CHECK)
    assert check.requested_by == "admin:admin"
    assert f'Queued upgrade check <a href="/jobs/{check.pk}/">#{check.pk}</a>' in said(first)
    assert queued_tasks() == [f"job-{check.pk}"]
    # The changelist's button does the same without a selection, and goes to the check's page; the
    # check is already queued.
    assert admin_client.get(f"{BACKENDS_URL}check-now/").status_code == 405
    second = admin_client.post(f"{BACKENDS_URL}check-now/", follow=True)
    assert UpgradeJob.objects.filter(kind=JobKind.CHECK).count() == 1
    assert f'A check is already queued as job <a href="/jobs/{check.pk}/">#{check.pk}</a>' in said(second)
    assert second.redirect_chain[-1][0] == f"{JOBS_URL}{check.pk}/change/"


def test_changelist_offers_the_check_button_and_the_actions(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    page = admin_client.get(BACKENDS_URL).content.decode()
    assert 'id="admin-check-now"' in page
    for action in ("check_now", "install_selected", "upgrade_selected", "rollback_selected", "pin_selected"):
        assert f'value="{action}"' in page


def test_staff_without_the_operate_permission_cannot_queue(client: Any, backends: dict[str, Backend]) -> None:
    user = get_user_model().objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(codename="view_backend"), Permission.objects.get(codename="change_backend")
    )
    client.force_login(user)
    page = client.get(BACKENDS_URL)
    assert page.status_code == 200
    assert 'value="upgrade_selected"' not in page.content.decode()
    assert 'id="admin-check-now"' not in page.content.decode()
    act(client, "upgrade_selected", [backends["alpha"]])
    assert client.post(f"{BACKENDS_URL}check-now/").status_code == 403
    assert not UpgradeJob.objects.exists()
    user.user_permissions.add(Permission.objects.get(codename="operate_backend"))
    act(client, "upgrade_selected", [backends["alpha"]])
    assert UpgradeJob.objects.get().requested_by == "admin:viewer"


def test_backend_changelist_shows_versions_per_node_and_the_reason(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    other = Node.objects.create(name="gpu-box", backends_path="/srv/backends")
    install_row(backends["alpha"], "v0.9", node=other)
    Backend.objects.filter(name="alpha").update(
        upgrade_available=True, available_version="v2", upgrade_reason="version v1 -> v2 in the gallery"
    )
    page = admin_client.get(BACKENDS_URL).content.decode()
    assert "v0.9 <small>on gpu-box</small>, v1 <small>on test-node</small>" in page
    assert "version v1 -&gt; v2 in the gallery" in page

    def names(query: str) -> set[str]:
        return {row.name for row in admin_client.get(f"{BACKENDS_URL}?{query}").context["cl"].result_list}

    assert names("installed=yes") == {"alpha", "beta"}
    assert names("installed=no") == {"gamma"}
    assert names(f"node={other.pk}") == {"alpha"}
    assert names("upgrade_available__exact=1") == {"alpha"}
    assert names("q=gam") == {"gamma"}


def test_job_changelist_shows_progress_and_links_to_the_live_view(
    admin_client: Any, backends: dict[str, Backend]
) -> None:
    job, _ = backends["alpha"].request(JobKind.UPGRADE, requested_by="admin:admin", queue=False)
    job.start()
    job.set_phase("downloading", "downloading")
    job.set_progress(512 * 1024, 2 * 1024 * 1024)
    page = admin_client.get(JOBS_URL).content.decode()
    assert "25% of 2.0\xa0MiB" in page
    assert f'<a href="{JOBS_URL}{job.pk}/change/">{job.pk}</a>' in page
    assert "running</span> <small>Downloading</small>" in page
    assert "v1 → …" in page
    detail = admin_client.get(f"{JOBS_URL}{job.pk}/change/").content.decode()
    assert 'id="job-progress" max="100" value="25.0"' in detail  # the live part, as on the job page
    assert f'href="/jobs/{job.pk}/"' in detail
    active = admin_client.get(f"{JOBS_URL}?group=active").context["cl"].result_list
    assert [row.pk for row in active] == [job.pk]
    assert admin_client.get(f"{JOBS_URL}?group=finished").context["cl"].result_count == 0


def test_cancel_selected_cancels_a_queued_job(admin_client: Any, backends: dict[str, Backend]) -> None:
    job, _ = backends["alpha"].request(JobKind.UPGRADE, requested_by="x", queue=False)
    response = act(admin_client, "cancel_selected", [job], url=JOBS_URL)
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert job.message == "cancelled by admin:admin"
    assert "Cancelled or asked to stop 1 job(s)" in said(response)


# --- query counts -------------------------------------------------------------------------------


def populate(gallery_factory: Any, count: int) -> None:
    """`count` backends (and galleries, and nodes), each backend installed on two nodes with a kept
    version and a finished job."""
    for g in range(count // 8):
        gallery_factory([{"name": f"g{g}-b", "uri": f"127.0.0.1:9/demo/g{g}:latest"}], name=f"g{g}")
        Node.objects.get_or_create(name=f"node-x{g}", defaults={"backends_path": f"/srv/x{g}"})
    gallery_factory([{"name": f"b{i:03}", "uri": f"127.0.0.1:9/demo/b{i}:latest"} for i in range(count)])
    local = Node.local()
    other, _ = Node.objects.get_or_create(name="node-b", defaults={"backends_path": "/srv/b"})
    for backend in Backend.objects.exclude(installed__isnull=False):
        for node in (local, other):
            install_row(backend, "v1", node=node)
        install_row(backend, "v0", state=InstalledVersion.State.KEPT)
        job = UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=backend, node=local, requested_by="t")
        job.start()
        job.set_progress(10, 20)
        job.finish("done")


CHANGELISTS = [
    "/admin/backends_app/backend/",
    "/admin/backends_app/backend/?installed=yes&upgrade_available__exact=0",
    "/admin/backends_app/installedversion/",
    "/admin/backends_app/upgradejob/",
    "/admin/backends_app/node/",
    "/admin/backends_app/gallery/",
]


@pytest.mark.parametrize("url", CHANGELISTS)
def test_every_changelist_costs_a_fixed_number_of_queries(
    admin_client: Any, gallery_factory: Any, django_assert_max_num_queries: Any, url: str
) -> None:
    populate(gallery_factory, 1)
    admin_client.get(url)  # session and content types warmed up
    with CaptureQueriesContext(connection) as one_row:
        assert admin_client.get(url).status_code == 200
    populate(gallery_factory, 40)
    with django_assert_max_num_queries(len(one_row)):
        response = admin_client.get(url)
    assert response.status_code == 200
    assert response.context["cl"].result_count >= 5  # many rows shown, at the cost of one
    assert len(one_row) <= 15


def test_settings_changelist_opens_the_one_settings_row(admin_client: Any) -> None:
    response = admin_client.get("/admin/backends_app/portalsettings/")
    assert response.status_code == 302
    assert response["Location"].endswith(f"/portalsettings/{PortalSettings.load().pk}/change/")
