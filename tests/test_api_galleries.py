"""The galleries endpoints: list, follow a new one (URL checked), and sync one inline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backends_app.models import Backend, Gallery
from tests.helpers.api import client_for, make_user

pytestmark = pytest.mark.django_db

INDEX = """
- name: cpu-whisper
  uri: quay.io/example/backends:cpu-whisper
  version: "1.0"
- name: whisper
  capabilities:
    default: cpu-whisper
"""


@pytest.fixture
def api() -> Any:
    perms = ("backends_app.add_gallery", "backends_app.change_gallery")
    return client_for(make_user("curator", perms=perms))


@pytest.fixture
def index_file(tmp_path: Path) -> Path:
    path = tmp_path / "index.yaml"
    path.write_text(INDEX)
    return path


def test_galleries_are_listed_with_their_sync_state(api: Any) -> None:
    Gallery.objects.all().delete()
    Gallery.objects.create(name="mine", url="file:///srv/index.yaml", last_error="boom", entry_count=3)

    body = api.get("/api/v1/galleries/").json()

    assert body["count"] == 1
    assert body["results"][0] == {
        "name": "mine",
        "url": "file:///srv/index.yaml",
        "has_credentials": False,
        "enabled": True,
        "signature_mode": "off",
        "verification": None,
        "entry_count": 3,
        "last_synced_at": None,
        "last_attempt_at": None,
        "last_error": "boom",
    }
    assert api.get("/api/v1/galleries/mine/").json()["name"] == "mine"
    assert api.get("/api/v1/galleries/nope/").status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "https://example.org/index.yaml",
        "file:///srv/galleries/index.yaml",
        "github:me/repo/backend/index.yaml@dev",
    ],
)
def test_a_gallery_with_a_supported_url_is_created(api: Any, url: str, settings: Any) -> None:
    settings.PORTAL_GALLERY_FILE_ROOTS = [Path("/srv/galleries")]

    response = api.post("/api/v1/galleries/", {"name": "new", "url": url}, format="json")

    assert response.status_code == 201, response.json()
    created = Gallery.objects.get(name="new")
    assert created.url == url and created.set_through_web


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"name": "bad", "url": "ftp://example.org/x.yaml"}, "url", "unsupported gallery URL"),
        ({"name": "bad", "url": "file://relative/path"}, "url", "absolute path"),
        ({"name": "bad", "url": "github:only-owner"}, "url", "github:owner/repo"),
        ({"name": "bad", "url": ""}, "url", "blank"),
        ({"name": "bad", "url": "https://[::1"}, "url", "is malformed"),
        ({"name": "bad", "url": 42}, "url", "Must be a string"),
        ({"name": "bad", "url": "file:///srv/\u0000"}, "url", "Null characters"),
        ({"name": "not a slug!", "url": "https://example.org/i.yaml"}, "name", "slug"),
        ({"name": "x" * 101, "url": "https://example.org/i.yaml"}, "name", "100"),
        ({"url": "https://example.org/i.yaml"}, "name", "required"),
        ({"name": "dup", "url": "https://example.org/i.yaml"}, "name", "already exists"),
    ],
)
def test_a_gallery_with_bad_input_is_a_400_with_the_reason(
    api: Any, body: dict[str, Any], field: str, message: str
) -> None:
    Gallery.objects.create(name="dup", url="https://example.org/dup.yaml")
    before = Gallery.objects.count()

    response = api.post("/api/v1/galleries/", body, format="json")

    assert response.status_code == 400
    assert message in " ".join(response.json()[field])
    assert Gallery.objects.count() == before


def test_syncing_a_gallery_stores_its_backends_and_answers_the_summary(api: Any, index_file: Path) -> None:
    Gallery.objects.create(name="local", url=index_file.as_uri())

    response = api.post("/api/v1/galleries/local/sync/")

    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["error"] == ""
    assert (body["total"], body["created"], body["updated"], body["gone"]) == (2, 2, 0, 0)
    assert body["summary"].startswith("local: 2 entries, 2 new")
    assert Backend.objects.get(name="whisper").resolves_to.name == "cpu-whisper"

    again = api.post("/api/v1/galleries/local/sync/", {"force": True}, format="json").json()
    assert again["ok"] and again["created"] == 0


def test_a_failed_sync_is_a_502_with_the_error_and_changes_nothing(api: Any, tmp_path: Path) -> None:
    Gallery.objects.create(name="broken", url=(tmp_path / "missing.yaml").as_uri())

    response = api.post("/api/v1/galleries/broken/sync/")

    assert response.status_code == 502
    body = response.json()
    assert body["ok"] is False and body["error"] and "sync failed" in body["summary"]
    assert Gallery.objects.get(name="broken").last_error == body["error"]
    assert not Backend.objects.filter(gallery__name="broken").exists()


def test_syncing_an_unknown_gallery_is_a_404(api: Any) -> None:
    assert api.post("/api/v1/galleries/nowhere/sync/").status_code == 404


def test_a_stored_url_urllib_cannot_read_makes_the_sync_a_502_not_a_crash(api: Any) -> None:
    Gallery.objects.create(name="odd", url="https://[::1/index.yaml")  # made outside the API

    response = api.post("/api/v1/galleries/odd/sync/")

    assert response.status_code == 502 and "malformed" in response.json()["error"]
