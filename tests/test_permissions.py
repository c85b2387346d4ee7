"""One rule for every entry point: Django permissions decide, superusers hold them all, staff status
alone grants nothing.

A matrix of users (anonymous, a plain user, staff without permissions, a holder of each permission, a
superuser) against every door that changes something: the REST API's writes, the pages' POSTs and the
admin's actions and change forms. Each cell asserts the real HTTP status and, when refused, that nothing
changed. The health-check command, which runs on every node, is a superuser's alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser, Permission
from django.test import Client

from backends_app import permissions
from backends_app.models import Backend, Gallery, JobKind, JobStatus, Node, PortalSettings, UpgradeJob
from tests.helpers.api import client_for, flag_upgrade, install, make_backend, make_gallery

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

OPERATE = "backends_app.operate_backend"
CHANGE_SETTINGS = "backends_app.change_portalsettings"
ADD_GALLERY = "backends_app.add_gallery"
CHANGE_GALLERY = "backends_app.change_gallery"
SUPERUSER = "superuser"  # what the health-check command needs

# Who: (is_staff, is_superuser, permissions). Holders of a permission are not staff here: staff status
# must neither be needed (API, pages) nor be enough.
USERS: dict[str, tuple[bool, bool, tuple[str, ...]] | None] = {
    "anonymous": None,
    "plain": (False, False, ()),
    "staff": (True, False, ()),
    "operator": (False, False, (OPERATE,)),
    "settings-editor": (False, False, (CHANGE_SETTINGS,)),
    "gallery-adder": (False, False, (ADD_GALLERY,)),
    "gallery-editor": (False, False, (CHANGE_GALLERY,)),
    "superuser": (True, True, ()),
}


def make(kind: str, *, staff: bool | None = None) -> Any:
    """The user of that kind (None for anonymous); `staff` overrides the kind's staff flag."""
    spec = USERS[kind]
    if spec is None:
        return None
    is_staff, is_superuser, perms = spec
    user = get_user_model().objects.create_user(
        kind, password="pw", is_staff=is_staff if staff is None else staff, is_superuser=is_superuser
    )
    for perm in perms:
        user.user_permissions.add(Permission.objects.get(codename=perm.split(".")[1]))
    return user


def allowed(kind: str, needs: str) -> bool:
    spec = USERS[kind]
    return spec is not None and (spec[1] or needs in spec[2])


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    """A gallery `main` (a real file) with backend `target` installed, one older version kept and an
    upgrade flagged; a queued install of `other` to cancel."""
    index = tmp_path / "index.yaml"
    index.write_text("- name: target\n  uri: quay.io/example/backends:target\n")
    gallery = make_gallery("main", url=index.as_uri())
    backend = flag_upgrade(make_backend(gallery, "target"))
    install(backend, kept=1)
    other = make_backend(gallery, "other")
    job = UpgradeJob.objects.create(kind=JobKind.INSTALL, backend=other, node=Node.local())
    PortalSettings.load()
    return {"gallery": gallery, "backend": backend, "job": job, "node": Node.local()}


def snapshot() -> tuple[Any, ...]:
    """Everything a refused request must leave as it was."""
    return (
        sorted(UpgradeJob.objects.values_list("id", "kind", "status", "cancel_requested")),
        sorted(Gallery.objects.values_list("name", "url", "enabled", "last_attempt_at")),
        list(PortalSettings.objects.values()),
        list(Backend.objects.order_by("pk").values_list("name", "pinned", "held_version", "updated_at")),
    )


def fill(text: str, world: dict[str, Any]) -> str:
    return text.format(
        job=world["job"].pk, backend=world["backend"].pk, gallery=world["gallery"].pk, node=world["node"].pk
    )


# --- the rule itself ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", USERS)
def test_the_rule_names_a_permission_for_each_action_and_superusers_hold_them_all(kind: str) -> None:
    user = make(kind) or AnonymousUser()
    for action, needs in [
        (permissions.OPERATE, OPERATE),
        (permissions.CHANGE_SETTINGS, CHANGE_SETTINGS),
        (permissions.ADD_GALLERY, ADD_GALLERY),
        (permissions.CHANGE_GALLERY, CHANGE_GALLERY),
        (permissions.SET_HEALTH_CHECK_COMMAND, SUPERUSER),
    ]:
        assert permissions.can(user, action) is allowed(kind, needs), (kind, action)


# --- the REST API ----------------------------------------------------------------------------------

# (method, path, body, what it needs, the status when allowed)
API_WRITES = [
    ("post", "/api/v1/backends/target/install/", {}, OPERATE, 202),
    ("post", "/api/v1/backends/target/upgrade/", {}, OPERATE, 202),
    ("post", "/api/v1/backends/target/rollback/", {}, OPERATE, 202),
    ("post", "/api/v1/backends/target/uninstall/", {}, OPERATE, 202),
    ("post", "/api/v1/backends/target/converge/", None, OPERATE, 202),
    ("post", "/api/v1/backends/target/pin/", None, OPERATE, 200),
    ("post", "/api/v1/backends/target/unpin/", None, OPERATE, 200),
    ("post", "/api/v1/upgrades/check/", None, OPERATE, 202),
    ("post", "/api/v1/upgrades/apply/", {}, OPERATE, 202),
    ("post", "/api/v1/jobs/{job}/cancel/", None, OPERATE, 200),
    ("post", "/backends/upgrades/check", None, OPERATE, 200),
    ("post", "/backends/upgrade/target", None, OPERATE, 200),
    ("patch", "/api/v1/settings/", {"versions_kept": 3}, CHANGE_SETTINGS, 200),
    ("patch", "/api/v1/settings/", {"health_check_command": "touch /tmp/owned"}, SUPERUSER, 200),
    ("post", "/api/v1/galleries/", {"name": "new", "url": "https://example.org/i.yaml"}, ADD_GALLERY, 201),
    ("post", "/api/v1/galleries/main/sync/", {}, CHANGE_GALLERY, 200),
]


@pytest.mark.parametrize("kind", USERS)
@pytest.mark.parametrize(("method", "path", "body", "needs", "status"), API_WRITES)
def test_api_writes_follow_the_permissions(
    world: dict[str, Any], kind: str, method: str, path: str, body: Any, needs: str, status: int
) -> None:
    user = make(kind)
    client = client_for(user)
    before = snapshot()

    response = getattr(client, method)(fill(path, world), body, format="json")

    if user is None:
        assert response.status_code == 401, response.content
        assert snapshot() == before
    elif allowed(kind, needs):
        assert response.status_code == status, response.content
        assert snapshot() != before
    else:
        assert response.status_code == 403, response.content
        text = response.content.decode()
        assert (needs in text) if needs != SUPERUSER else ("superuser" in text)
        assert snapshot() == before


def test_a_settings_editor_changes_other_settings_but_not_the_health_check_command(
    world: dict[str, Any],
) -> None:
    client = client_for(make("settings-editor"))
    PortalSettings.objects.update(health_check_command="./run.sh --health")

    same = client.patch(
        "/api/v1/settings/", {"health_check_command": "./run.sh --health", "versions_kept": 2}, format="json"
    )
    changed = client.patch(
        "/api/v1/settings/", {"health_check_command": "sh -c 'id'", "versions_kept": 4}, format="json"
    )

    assert same.status_code == 200  # sending the stored value back changes nothing: allowed
    assert changed.status_code == 403
    assert "health_check_command" in changed.json()["detail"]
    row = PortalSettings.load()
    assert (row.health_check_command, row.versions_kept) == ("./run.sh --health", 2)


# --- the pages -------------------------------------------------------------------------------------

# (method, path, form, what it needs); allowed answers are redirects to a job or back.
PAGE_WRITES = [
    ("post", "/backends/{backend}/upgrade/", {}, OPERATE),
    ("post", "/backends/{backend}/converge/", {}, OPERATE),
    ("post", "/backends/upgrade-all/", {}, OPERATE),
    ("post", "/check/", {}, OPERATE),
    ("post", "/jobs/{job}/cancel/", {}, OPERATE),
    ("post", "/settings/", {"check_interval_minutes": "60", "versions_kept": "3"}, CHANGE_SETTINGS),
    ("get", "/settings/", None, CHANGE_SETTINGS),
]


@pytest.mark.parametrize("kind", USERS)
@pytest.mark.parametrize(("method", "path", "form", "needs"), PAGE_WRITES)
def test_page_posts_follow_the_permissions(
    world: dict[str, Any], kind: str, method: str, path: str, form: Any, needs: str
) -> None:
    user = make(kind)
    client = Client()
    if user is not None:
        client.force_login(user)
    before = snapshot()

    response = getattr(client, method)(fill(path, world), form)

    if user is None:
        assert response.status_code == 302 and response["Location"].startswith("/login/")
        assert snapshot() == before
    elif allowed(kind, needs):
        assert response.status_code == (200 if method == "get" else 302), response.content[:300]
        if method == "post":
            assert not response["Location"].startswith("/login/")
            assert snapshot() != before
    else:
        assert response.status_code == 403
        assert snapshot() == before


@pytest.mark.parametrize("kind", [kind for kind in USERS if kind != "anonymous"])
def test_the_settings_link_shows_to_those_who_may_open_the_page(world: dict[str, Any], kind: str) -> None:
    client = Client()
    client.force_login(make(kind))

    page = client.get("/").content.decode()

    assert ('href="/settings/"' in page) is allowed(kind, CHANGE_SETTINGS)


# --- the admin -------------------------------------------------------------------------------------

BACKENDS = "/admin/backends_app/backend/"
JOBS = "/admin/backends_app/upgradejob/"
GALLERIES = "/admin/backends_app/gallery/"
SETTINGS = "/admin/backends_app/portalsettings/1/change/"
SETTINGS_FORM = {
    "auto_upgrade_backends": "on",
    "check_interval_minutes": "60",
    "versions_kept": "2",
    "health_check_command": "",
    "health_check_timeout": "30",
}

# (path, form, what it needs)
ADMIN_WRITES = [
    (BACKENDS, {"action": "upgrade_selected", "_selected_action": "{backend}", "index": "0"}, OPERATE),
    (BACKENDS, {"action": "pin_selected", "_selected_action": "{backend}", "index": "0"}, OPERATE),
    (f"{BACKENDS}check-now/", {}, OPERATE),
    (f"{BACKENDS}{{backend}}/operate/check/", {}, OPERATE),
    (f"{BACKENDS}{{backend}}/operate/upgrade/", {}, OPERATE),
    (f"{BACKENDS}{{backend}}/operate/rollback/", {"node": "{node}"}, OPERATE),
    (f"{BACKENDS}{{backend}}/operate/pin/", {}, OPERATE),
    (f"{JOBS}{{job}}/cancel/", {}, OPERATE),
    (JOBS, {"action": "cancel_selected", "_selected_action": "{job}", "index": "0"}, OPERATE),
    (f"{GALLERIES}add/", {"name": "new", "url": "https://example.org/i.yaml", "enabled": "on"}, ADD_GALLERY),
    (f"{GALLERIES}{{gallery}}/change/", {"name": "main", "url": "https://e.org/x.yaml"}, CHANGE_GALLERY),
    (GALLERIES, {"action": "sync_now", "_selected_action": "{gallery}", "index": "0"}, CHANGE_GALLERY),
    (SETTINGS, SETTINGS_FORM, CHANGE_SETTINGS),
]


@pytest.mark.parametrize("kind", USERS)
@pytest.mark.parametrize(("path", "form", "needs"), ADMIN_WRITES)
def test_admin_changes_follow_the_permissions(
    world: dict[str, Any], kind: str, path: str, form: dict[str, str], needs: str
) -> None:
    # The admin lets in staff only (Django's rule): the holders of a permission are staff here, and
    # the plain user shows that a permission without staff status does not open the admin.
    user = make(kind, staff=kind not in ("anonymous", "plain"))
    client = Client()
    if user is not None:
        client.force_login(user)
    before = snapshot()

    response = client.post(fill(path, world), {key: fill(value, world) for key, value in form.items()})

    if kind in ("anonymous", "plain"):
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
        assert snapshot() == before
    elif allowed(kind, needs):
        assert response.status_code == 302, response.content[:2000]
        assert "/login/" not in response["Location"]
        assert snapshot() != before
    else:
        assert response.status_code == 403
        assert snapshot() == before


def test_staff_with_the_view_permission_cannot_sync_a_gallery(world: dict[str, Any]) -> None:
    user = make("staff")
    user.user_permissions.add(Permission.objects.get(codename="view_gallery"))
    client = Client()
    client.force_login(user)
    assert client.get(GALLERIES).status_code == 200
    before = snapshot()

    response = client.post(
        GALLERIES, {"action": "sync_now", "_selected_action": world["gallery"].pk, "index": "0"}
    )

    assert response.status_code == 403
    assert snapshot() == before


def test_the_admin_shows_the_health_check_command_read_only_except_to_superusers(
    world: dict[str, Any],
) -> None:
    PortalSettings.objects.update(health_check_command="./run.sh --health")
    editor = make("settings-editor", staff=True)
    client = Client()
    client.force_login(editor)

    page = client.get(SETTINGS).content.decode()
    response = client.post(SETTINGS, {**SETTINGS_FORM, "health_check_command": "sh -c 'id > /tmp/x'"})

    assert 'name="health_check_command"' not in page and "./run.sh --health" in page
    assert response.status_code == 302
    row = PortalSettings.load()
    assert (row.health_check_command, row.check_interval_minutes) == ("./run.sh --health", 60)

    root = Client()
    root.force_login(make("superuser"))
    assert 'name="health_check_command"' in root.get(SETTINGS).content.decode()
    assert root.post(SETTINGS, {**SETTINGS_FORM, "health_check_command": "./run.sh --ok"}).status_code == 302
    assert PortalSettings.load().health_check_command == "./run.sh --ok"


def test_an_operator_sees_backends_and_jobs_in_the_admin_and_queues_from_there(
    world: dict[str, Any],
) -> None:
    client = Client()
    client.force_login(make("operator", staff=True))

    page = client.get(BACKENDS)
    jobs = client.get(JOBS)

    assert page.status_code == 200 and 'value="upgrade_selected"' in page.content.decode()
    assert jobs.status_code == 200 and 'value="cancel_selected"' in jobs.content.decode()
    client.post(
        BACKENDS, {"action": "upgrade_selected", "_selected_action": world["backend"].pk, "index": "0"}
    )
    job = UpgradeJob.objects.get(kind=JobKind.UPGRADE)
    assert (job.status, job.requested_by) == (JobStatus.QUEUED, "admin:operator")


def test_only_a_superuser_repoints_a_node_in_the_admin(world: dict[str, Any]) -> None:
    """A node's backends path is where its worker writes as the portal's user: Django's own
    `change_node` permission is not enough to change it."""
    node = Node.local()
    holder = get_user_model().objects.create(username="node-editor", is_staff=True)
    for codename in ("view_node", "change_node", "delete_node"):
        holder.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(holder)
    page = f"/admin/backends_app/node/{node.pk}/change/"
    form = {
        "name": node.name,
        "capability": node.capability,
        "platform": node.platform,
        "backends_path": "/etc",
        "state_path": "",
        "queue": "",
    }

    assert client.post(page, form).status_code == 403
    assert client.post(f"/admin/backends_app/node/{node.pk}/delete/", {"post": "yes"}).status_code == 403
    node.refresh_from_db()
    assert node.backends_path != "/etc"
    assert client.get(page).status_code == 200  # still shown, read-only
