"""Every error the API answers is JSON in the API's shape: `{"detail": ...}` under /api/v1/, LocalAI's
`{"error": {"code", "message", "type"}}` on the LocalAI routes. Oversized bodies, unknown paths, wrong
methods, server errors included; and a body field the endpoint does not take is refused by name,
never ignored. The pages keep their HTML errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from django.utils import timezone

from backends_app.models import Gallery, InstalledVersion, JobKind, PortalSettings, UpgradeJob
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
def world(tmp_path: Path) -> dict[str, Any]:
    index = tmp_path / "index.yaml"
    index.write_text("- name: target\n  uri: quay.io/example/backends:target\n")
    gallery = make_gallery("main", url=index.as_uri())
    backend = make_backend(gallery, "target")
    install(backend, kept=1)
    PortalSettings.load()
    return {"gallery": gallery, "backend": backend}


@pytest.fixture
def root() -> Any:
    """A superuser's API client that returns a server error's answer instead of raising it."""
    client = client_for(make_user("root", superuser=True))
    client.raise_request_exception = False
    return client


def snapshot() -> tuple[Any, ...]:
    return (
        list(UpgradeJob.objects.values_list("id", "kind", "status")),
        sorted(Gallery.objects.values_list("name", "url", "enabled", "last_attempt_at")),
        list(PortalSettings.objects.values()),
    )


def api_error(response: Any, status: int) -> str:
    """The `detail` of an /api/ error, after checking its status and that it is JSON."""
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json", response.content[:300]
    body = json.loads(response.content)
    assert set(body) == {"detail"}, body
    return str(body["detail"])


def localai_error(response: Any, status: int) -> str:
    """The message of a LocalAI route's error, after checking its status, JSON and LocalAI's envelope."""
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/json", response.content[:300]
    body = json.loads(response.content)
    assert set(body) == {"error"} and body["error"]["code"] == status, body
    assert isinstance(body["error"]["type"], str)  # "" for a handler's error, as LocalAI sends it
    return str(body["error"]["message"])


# --- bodies too large --------------------------------------------------------------------------------

OVERSIZED = [
    ("post", "/api/v1/galleries/", "api"),
    ("patch", "/api/v1/settings/", "api"),
    ("post", "/api/v1/backends/target/install/", "api"),
    ("post", "/api/v1/backends/target/pin/", "api"),
    ("post", "/api/v1/upgrades/apply/", "api"),
    ("post", "/backends/upgrade/target", "localai"),
    ("post", "/backends/upgrades/check", "localai"),
]


@pytest.mark.parametrize(("method", "path", "shape"), OVERSIZED)
def test_a_50_mb_body_is_a_413_in_json_and_changes_nothing(
    world: dict[str, Any], root: Any, method: str, path: str, shape: str
) -> None:
    body = json.dumps({"name": "x" * (50 * 1024 * 1024), "url": "https://example.org/i.yaml"})
    before = snapshot()

    response = root.generic(method.upper(), path, body, content_type="application/json")

    message = (api_error if shape == "api" else localai_error)(response, 413)
    assert str(settings.DATA_UPLOAD_MAX_MEMORY_SIZE) in message
    assert snapshot() == before


def test_a_body_just_under_the_limit_is_read(world: dict[str, Any], root: Any) -> None:
    padding = settings.DATA_UPLOAD_MAX_MEMORY_SIZE - 200
    body = json.dumps({"health_check_command": "x" * padding})

    response = root.generic("PATCH", "/api/v1/settings/", body, content_type="application/json")

    assert response.status_code == 400 and "health_check_command" in response.json()  # too long a value


# --- server errors ------------------------------------------------------------------------------------


def drop_table(model: Any) -> None:
    """A real fault: the table a view reads is gone (the test's transaction brings it back)."""
    postgres = connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        if postgres:  # run the foreign-key checks this transaction deferred, or the table cannot go
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute(f"DROP TABLE {model._meta.db_table}{' CASCADE' if postgres else ''}")


def test_a_server_error_under_the_api_is_a_500_in_json_without_internals(
    world: dict[str, Any], root: Any
) -> None:
    drop_table(PortalSettings)

    response = root.get("/api/v1/settings/")

    detail = api_error(response, 500)
    assert "portalsettings" not in detail.lower() and "Traceback" not in detail
    assert "server error" in detail.lower()


def test_a_server_error_on_a_localai_route_is_a_500_in_localais_envelope(
    world: dict[str, Any], root: Any
) -> None:
    flag_upgrade(world["backend"])  # so the answer reads the installed versions
    drop_table(InstalledVersion)

    message = localai_error(root.get("/backends/upgrades"), 500)

    assert "installedversion" not in message.lower() and "server error" in message.lower()


# --- unknown paths and methods -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/v1/nothing-here/", "/api/v1/backends/target/explode/", "/api/v1/jobs/1/x/"]
)
def test_an_unknown_api_path_is_a_404_in_json(root: Any, path: str) -> None:
    assert api_error(root.get(path), 404)
    assert api_error(root.post(path, {}, format="json"), 404)


@pytest.mark.parametrize(
    "path",
    ["/backends/nothing", "/backends/upgrade/a/b", "/backends/jobs", "/api/backends/x/y", "/api/nothing"],
)
def test_an_unknown_localai_path_is_a_404_in_localais_envelope(root: Any, path: str) -> None:
    assert localai_error(root.get(path), 404)


def test_the_pages_keep_their_html_errors(world: dict[str, Any]) -> None:
    client = Client()
    client.force_login(make_user("ops", perms=(OPERATE,)))

    missing_backend = client.post("/backends/999999/upgrade/")
    unknown_page = client.get("/nothing-here/")

    assert missing_backend.status_code == 404 and missing_backend["Content-Type"].startswith("text/html")
    assert unknown_page.status_code == 404 and unknown_page["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("put", "/api/v1/settings/"),
        ("delete", "/api/v1/settings/"),
        ("delete", "/api/v1/galleries/main/"),
        ("get", "/api/v1/upgrades/check/"),
        ("put", "/api/v1/backends/target/"),
        ("post", "/api/schema/"),
        ("post", "/api/docs/"),
    ],
)
def test_a_wrong_method_under_the_api_is_a_405_in_json(
    world: dict[str, Any], root: Any, method: str, path: str
) -> None:
    before = snapshot()

    response = getattr(root, method)(path, {}, format="json")

    assert method.upper() in api_error(response, 405)
    assert snapshot() == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("put", "/backends/upgrade/target"),
        ("get", "/backends/upgrades/check"),
        ("post", "/backends/upgrades"),
    ],
)
def test_a_wrong_method_on_a_localai_route_is_a_405_in_localais_envelope(
    world: dict[str, Any], root: Any, method: str, path: str
) -> None:
    assert method.upper() in localai_error(getattr(root, method)(path, {}, format="json"), 405)


# --- fields an endpoint does not take --------------------------------------------------------------------

UNKNOWN_FIELDS = [
    ("patch", "/api/v1/settings/", {"versions_kept": 2, "colour": "red"}, ["colour"]),
    ("patch", "/api/v1/settings/", {"auto_upgrade": True}, ["auto_upgrade"]),
    ("patch", "/api/v1/settings/", {"last_check_at": "2020-01-01T00:00:00Z"}, ["last_check_at"]),
    ("post", "/api/v1/galleries/", {"name": "x", "url": "https://e.org/i.yaml", "token": "t"}, ["token"]),
    (
        "post",
        "/api/v1/galleries/",
        {"name": "x", "url": "https://e.org/i.yaml", "entry_count": 1},
        ["entry_count"],
    ),
    ("post", "/api/v1/galleries/main/sync/", {"forced": True}, ["forced"]),
    ("post", "/api/v1/backends/target/install/", {"nodes": ["a"]}, ["nodes"]),
    ("post", "/api/v1/backends/target/upgrade/", {"force": True, "version": "2.0"}, ["version"]),
    ("post", "/api/v1/backends/target/pin/", {"reason": "x"}, ["reason"]),
    ("post", "/api/v1/backends/target/converge/", {"node": "x"}, ["node"]),
    ("post", "/api/v1/upgrades/check/", {"force": True}, ["force"]),
    ("post", "/api/v1/upgrades/apply/", {"force": True, "only": "x"}, ["force", "only"]),
]


@pytest.mark.parametrize(("method", "path", "body", "unknown"), UNKNOWN_FIELDS)
def test_a_field_the_endpoint_does_not_take_is_a_400_naming_it(
    world: dict[str, Any], root: Any, method: str, path: str, body: dict[str, Any], unknown: list[str]
) -> None:
    before = snapshot()

    response = getattr(root, method)(path, body, format="json")

    assert response.status_code == 400, response.content
    assert sorted(response.json()) == sorted(unknown)
    assert snapshot() == before


def test_cancelling_with_a_body_field_is_a_400_and_the_job_stays_queued(
    world: dict[str, Any], root: Any
) -> None:
    job = UpgradeJob.objects.create(kind=JobKind.CHECK)

    response = root.post(f"/api/v1/jobs/{job.pk}/cancel/", {"why": "x"}, format="json")

    assert response.status_code == 400 and list(response.json()) == ["why"]
    job.refresh_from_db()
    assert (job.status, job.cancel_requested) == ("queued", False)


def test_a_localai_route_refuses_an_unknown_field_and_takes_the_empty_body_localais_ui_sends(
    world: dict[str, Any], root: Any
) -> None:
    refused = root.post("/backends/upgrade/target", {"backend": "target"}, format="json")

    assert "backend" in localai_error(refused, 400)
    assert not UpgradeJob.objects.exists()
    assert root.post("/backends/upgrade/target", {}, format="json").status_code == 200
    assert root.post("/backends/upgrades/check", {}, format="json").status_code == 200
    assert root.post("/backends/upgrades/check").status_code == 200


def test_known_fields_still_work(world: dict[str, Any], root: Any) -> None:
    answer = root.patch("/api/v1/settings/", {"versions_kept": 2}, format="json")
    pinned = root.post("/api/v1/backends/target/pin/")
    synced = root.post("/api/v1/galleries/main/sync/", {"force": True}, format="json")

    assert answer.status_code == 200 and PortalSettings.load().versions_kept == 2
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    assert synced.status_code == 200 and synced.json()["ok"] is True
    assert PortalSettings.load().updated_at <= timezone.now()
