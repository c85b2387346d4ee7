"""Who may do what: anonymous users nothing, signed-in users read, permission holders (and superusers)
change; staff status alone changes nothing (the full matrix is in test_permissions.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from backends_app.models import Gallery, JobKind, PortalSettings, UpgradeJob
from tests.helpers.api import OPERATE, client_for, install, make_backend, make_gallery, make_user

pytestmark = pytest.mark.django_db

READS = [
    "/api/v1/",
    "/api/v1/backends/",
    "/api/v1/backends/target/",
    "/api/v1/upgrades/",
    "/api/v1/jobs/",
    "/api/v1/jobs/{job}/",
    "/api/v1/settings/",
    "/api/v1/galleries/",
    "/api/v1/galleries/main/",
    "/backends",
    "/backends/available",
    "/backends/known",
    "/backends/galleries",
    "/backends/upgrades",
    "/backends/jobs/{uuid}",
    "/api/backends",
    "/api/backends/job/{uuid}",
    "/api/backends/upgrades",
    "/api/operations",
    "/api/operations/history",
]
# (method, path, permission that allows it)
WRITES = [
    ("post", "/api/v1/backends/target/install/", OPERATE),
    ("post", "/api/v1/backends/target/upgrade/", OPERATE),
    ("post", "/api/v1/backends/target/rollback/", OPERATE),
    ("post", "/api/v1/backends/target/uninstall/", OPERATE),
    ("post", "/api/v1/backends/target/pin/", OPERATE),
    ("post", "/api/v1/backends/target/unpin/", OPERATE),
    ("post", "/api/v1/upgrades/check/", OPERATE),
    ("post", "/api/v1/upgrades/apply/", OPERATE),
    ("post", "/api/v1/jobs/{job}/cancel/", OPERATE),
    ("post", "/backends/apply", OPERATE),
    ("post", "/backends/delete/target", OPERATE),
    ("post", "/backends/upgrades/check", OPERATE),
    ("post", "/backends/upgrade/target", OPERATE),
    ("post", "/api/backends/install/target", OPERATE),
    ("post", "/api/backends/delete/target", OPERATE),
    ("post", "/api/backends/system/delete/target", OPERATE),
    ("post", "/api/backends/install-external", OPERATE),
    ("post", "/api/backends/upgrades/check", OPERATE),
    ("post", "/api/backends/upgrade/target", OPERATE),
    ("post", "/api/operations/{uuid}/cancel", OPERATE),
    ("post", "/api/operations/{uuid}/pause", OPERATE),
    ("post", "/api/operations/{uuid}/dismiss", OPERATE),
    ("delete", "/api/operations/history", OPERATE),
    ("patch", "/api/v1/settings/", "backends_app.change_portalsettings"),
    ("post", "/api/v1/galleries/", "backends_app.add_gallery"),
    ("post", "/api/v1/galleries/main/sync/", "backends_app.change_gallery"),
]


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    index = tmp_path / "index.yaml"
    index.write_text("- name: target\n  uri: quay.io/example/backends:target\n")
    gallery = make_gallery("main", url=index.as_uri())
    backend = make_backend(gallery, "target")
    install(backend, kept=1)
    job = UpgradeJob.objects.create(kind=JobKind.CHECK)
    return {"gallery": gallery, "backend": backend, "job": job}


# The bodies of the writes that take some (LocalAI's install routes).
BODIES = {
    "/backends/apply": {"id": "target"},
    "/api/backends/install-external": {"uri": "oci://quay.io/example/backends:other", "name": "other"},
}


def url(path: str, world: dict[str, Any]) -> str:
    return path.format(job=world["job"].pk, uuid=world["job"].uuid)


def snapshot() -> tuple[Any, ...]:
    return (
        list(UpgradeJob.objects.values_list("id", "status", "cancel_requested")),
        list(Gallery.objects.values_list("name", "url", "last_attempt_at")),
        PortalSettings.load().updated_at,
    )


@pytest.mark.parametrize("path", READS + [path for _, path, _ in WRITES])
def test_anonymous_requests_get_401(world: dict[str, Any], path: str) -> None:
    client = APIClient()

    response = client.get(url(path, world)) if path in READS else client.post(url(path, world), {})

    assert response.status_code == 401
    # LocalAI's routes ask for LocalAI's credential, a Bearer key; the portal's API for its token.
    assert response["WWW-Authenticate"] == ("Token" if path.startswith("/api/v1/") else "Bearer")


@pytest.mark.parametrize("path", READS)
def test_any_signed_in_user_can_read(world: dict[str, Any], path: str) -> None:
    response = client_for(make_user("reader")).get(url(path, world))

    assert response.status_code == 200


@pytest.mark.parametrize(("method", "path", "perm"), WRITES)
def test_a_signed_in_user_without_the_permission_cannot_change_anything(
    world: dict[str, Any], method: str, path: str, perm: str
) -> None:
    before = snapshot()

    response = getattr(client_for(make_user("reader")), method)(
        url(path, world),
        {"name": "new", "url": "https://example.org/i.yaml", "versions_kept": 3},
        format="json",
    )

    assert response.status_code == 403
    assert perm in str(response.json())
    assert snapshot() == before


@pytest.mark.parametrize(("method", "path", "perm"), WRITES)
def test_the_named_permission_or_superuser_status_allows_the_change(
    world: dict[str, Any], method: str, path: str, perm: str
) -> None:
    body = {"patch": {"versions_kept": 3}, "post": {}, "delete": {}}[method]
    body = BODIES.get(path, body)
    if path == "/api/v1/galleries/":
        body = {"name": "new", "url": "https://example.org/i.yaml"}
    for user in (make_user("holder", perms=(perm,)), make_user("root", superuser=True)):
        UpgradeJob.objects.exclude(pk=world["job"].pk).delete()  # let the second user queue again
        UpgradeJob.objects.filter(pk=world["job"].pk).update(status="queued", finished_at=None)  # and cancel
        response = getattr(client_for(user), method)(url(path, world), body, format="json")
        Gallery.objects.filter(name="new").delete()
        # Allowed through: whatever the verb answers (202, 200, 409) is not a permission refusal.
        assert response.status_code in (200, 201, 202, 409), (user, response.json())


@pytest.mark.parametrize(("method", "path", "perm"), WRITES)
def test_staff_status_alone_changes_nothing(world: dict[str, Any], method: str, path: str, perm: str) -> None:
    before = snapshot()

    response = getattr(client_for(make_user("staff", staff=True)), method)(
        url(path, world), {"versions_kept": 3}, format="json"
    )

    assert response.status_code == 403
    assert perm in str(response.json())
    assert snapshot() == before


def test_an_operator_cannot_change_settings_or_galleries(world: dict[str, Any]) -> None:
    operator = client_for(make_user("operator", perms=(OPERATE,)))

    assert operator.post("/api/v1/backends/target/pin/").status_code == 200
    assert operator.patch("/api/v1/settings/", {"versions_kept": 3}, format="json").status_code == 403
    assert (
        operator.post("/api/v1/galleries/", {"name": "x", "url": "https://e.org/i.yaml"}).status_code == 403
    )


def test_session_sign_in_needs_the_csrf_token_to_change_anything(world: dict[str, Any]) -> None:
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(make_user("browser", perms=(OPERATE,)))

    assert client.get("/api/v1/backends/").status_code == 200
    refused = client.post("/api/v1/backends/target/pin/")
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]

    client.get("/")  # sets the csrftoken cookie, as any page with a form does
    token = client.cookies["csrftoken"].value
    allowed = client.post("/api/v1/backends/target/pin/", HTTP_X_CSRFTOKEN=token)
    assert allowed.status_code == 200 and allowed.json()["pinned"] is True


def test_a_token_made_with_drf_create_token_signs_a_script_in(world: dict[str, Any]) -> None:
    make_user("script", perms=(OPERATE,))
    out = io.StringIO()

    call_command("drf_create_token", "script", stdout=out)

    key = Token.objects.get(user__username="script").key
    assert key in out.getvalue()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.post("/api/v1/backends/target/upgrade/", {}, format="json").status_code == 202
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/v1/jobs/").json()["count"] == 2


@pytest.mark.parametrize("header", ["Token not-a-real-key", "Bearer ", "Token a b", "Basic dXNlcjpwYXNz"])
def test_a_bad_credential_is_a_401(world: dict[str, Any], header: str) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)

    assert client.get("/api/v1/backends/").status_code == 401


def test_an_inactive_users_token_no_longer_works(world: dict[str, Any]) -> None:
    user = make_user("leaver", staff=True)
    client = client_for(user)
    user.is_active = False
    user.save()

    assert client.get("/api/v1/backends/").status_code == 401


def test_the_schema_and_the_docs_page_are_open_to_anonymous_users() -> None:
    client = APIClient()

    assert client.get("/api/schema/").status_code == 200
    assert client.get("/api/docs/").status_code == 200
