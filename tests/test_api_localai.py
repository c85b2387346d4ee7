"""LocalAI's own routes: LocalAI's paths, field names and JSON types, over the same verbs."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from backends_app.api.localai import format_bytes
from backends_app.models import JobKind, JobStatus, Node, UpgradeJob
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

# LocalAI's OpStatus keys that are always there; `error`, `phase`, the byte counts and `nodes` only
# when they say something (core/services/galleryop/operation.go).
OP_STATUS_KEYS = {
    "deletion",
    "file_name",
    "processed",
    "message",
    "progress",
    "file_size",
    "downloaded_size",
    "gallery_element_name",
    "cancelled",
    "cancellable",
}


@pytest.fixture
def user() -> Any:
    return make_user("localai-client", perms=(OPERATE,))


@pytest.fixture
def api(user: Any) -> Any:
    return client_for(user, keyword="Bearer")  # LocalAI clients send their API key as a Bearer token


@pytest.fixture
def gallery() -> Any:
    return make_gallery("main")


def test_upgrades_are_keyed_by_name_with_localais_fields(api: Any, gallery: Any) -> None:
    install(flag_upgrade(make_backend(gallery, "cpu-whisper"), version="2.0"), version="1.0")
    install(flag_upgrade(make_backend(gallery, "no-digests"), digest=""), digest="")
    install(make_backend(gallery, "current"))

    response = api.get("/backends/upgrades")

    assert response.status_code == 200
    assert response.json() == {
        "cpu-whisper": {
            "backend_name": "cpu-whisper",
            "installed_version": "1.0",
            "available_version": "2.0",
            "installed_digest": "sha256:" + "a" * 64,
            "available_digest": "sha256:" + "b" * 64,
        },
        # LocalAI's UpgradeInfo omits empty digests.
        "no-digests": {"backend_name": "no-digests", "installed_version": "1.0", "available_version": "2.0"},
    }


def test_a_name_shared_by_two_galleries_keeps_both_keys_apart(api: Any, gallery: Any) -> None:
    install(flag_upgrade(make_backend(gallery, "piper")))
    install(flag_upgrade(make_backend(make_gallery("extra"), "piper")), Node.objects.create(name="n2"))

    make_backend(gallery, "kokoro")
    install(flag_upgrade(make_backend(make_gallery("third"), "kokoro")))

    assert set(api.get("/backends/upgrades").json()) == {"main@piper", "extra@piper", "third@kokoro"}
    assert api.post("/backends/upgrade/third@kokoro").status_code == 200


def test_check_queues_a_check_and_answers_like_localai_with_the_known_upgrades(
    api: Any, gallery: Any
) -> None:
    install(flag_upgrade(make_backend(gallery, "bark")))

    response = api.post("/backends/upgrades/check")

    assert response.status_code == 200
    assert set(response.json()) == {"bark"}
    job = UpgradeJob.objects.get(kind=JobKind.CHECK)
    assert job.requested_by == "api:localai-client"
    assert response["Location"].endswith(f"/backends/jobs/{job.uuid}")
    assert api.post("/backends/upgrades/check")["Location"] == response["Location"]


def test_upgrade_answers_the_jobs_uuid_and_its_status_url(api: Any, gallery: Any) -> None:
    install(flag_upgrade(make_backend(gallery, "kokoro")))

    response = api.post("/backends/upgrade/kokoro")

    assert response.status_code == 200
    body = response.json()
    job = UpgradeJob.objects.get()
    assert body == {"id": str(job.uuid), "status_url": f"http://testserver/backends/jobs/{job.uuid}"}
    assert job.kind == JobKind.UPGRADE and job.requested_by == "api:localai-client"
    # Asking again follows the same job rather than queueing another.
    assert api.post("/backends/upgrade/kokoro").json()["id"] == str(job.uuid)
    assert UpgradeJob.objects.count() == 1


@pytest.mark.parametrize(
    ("name", "code", "fragment"),
    [("ghost", 404, "no backend named"), ("pinned", 409, "is pinned"), ("absent", 409, "not installed")],
)
def test_upgrade_errors_come_in_localais_error_envelope(
    api: Any, gallery: Any, name: str, code: int, fragment: str
) -> None:
    install(make_backend(gallery, "pinned", pinned=True))
    make_backend(gallery, "absent")

    response = api.post(f"/backends/upgrade/{name}")

    assert response.status_code == code
    error = response.json()["error"]
    assert error["code"] == code and fragment in error["message"] and error["type"] == ""


def test_job_status_has_localais_keys_and_types(api: Any, gallery: Any) -> None:
    backend = make_backend(gallery, "whisper")
    job = UpgradeJob.objects.create(
        kind=JobKind.UPGRADE,
        backend=backend,
        node=Node.local(),
        status=JobStatus.RUNNING,
        message="downloading layer 2/3",
        source="quay.io/example/backends:whisper",
        bytes_done=12_897_484,
        bytes_total=104_857_600,
        percent=12.3,
    )

    body = api.get(f"/backends/jobs/{job.uuid}").json()

    assert set(body) == OP_STATUS_KEYS | {"phase", "current_bytes", "total_bytes"}
    assert body == {
        "deletion": False,
        "file_name": "quay.io/example/backends:whisper",
        "processed": False,
        "message": "downloading layer 2/3",
        "progress": 12.3,
        "phase": "queued",
        "current_bytes": 12_897_484,
        "total_bytes": 104_857_600,
        "file_size": "100.0 MiB",
        "downloaded_size": "12.3 MiB",
        "gallery_element_name": "whisper",
        "cancelled": False,
        "cancellable": True,
    }
    # LocalAI's struct order.
    assert list(body) == [
        "deletion",
        "file_name",
        "processed",
        "message",
        "progress",
        "phase",
        "current_bytes",
        "total_bytes",
        "file_size",
        "downloaded_size",
        "gallery_element_name",
        "cancelled",
        "cancellable",
    ]


def test_a_finished_job_reads_as_processed_and_a_failed_one_carries_its_error(api: Any, gallery: Any) -> None:
    backend = make_backend(gallery, "whisper")
    failed = UpgradeJob.objects.create(
        kind=JobKind.UNINSTALL, backend=backend, status=JobStatus.FAILED, error="disk full"
    )
    cancelled = UpgradeJob.objects.create(kind=JobKind.CHECK, status=JobStatus.CANCELLED, message="cancelled")

    failed_body = api.get(f"/backends/jobs/{failed.uuid}").json()
    cancelled_body = api.get(f"/backends/jobs/{cancelled.uuid}").json()

    assert failed_body["processed"] is True and failed_body["deletion"] is True
    assert failed_body["error"] == "disk full" and failed_body["message"] == "error: disk full"
    assert failed_body["cancellable"] is False and failed_body["file_size"] == ""
    assert isinstance(failed_body["progress"], float) and "phase" not in failed_body
    assert cancelled_body["cancelled"] is True and cancelled_body["processed"] is True
    assert cancelled_body["message"] == "cancelled"
    # LocalAI never sends `"error": null`: the key is there only when the operation failed.
    assert cancelled_body["gallery_element_name"] == "" and "error" not in cancelled_body


@pytest.mark.parametrize("job_id", ["{pk}", "abc", "1e3", "9" * 30, "6ba7b810-9dad-11d1-80b4-00c04fd430c8"])
def test_an_unknown_job_is_a_404_in_localais_envelope(api: Any, job_id: str) -> None:
    job = UpgradeJob.objects.create(kind=JobKind.CHECK)  # ids here are UUIDs: its number names nothing

    response = api.get(f"/backends/jobs/{job_id.format(pk=job.pk)}")

    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": 404, "message": "could not find any status for ID", "type": ""}
    }


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_sizes_are_written_as_localai_writes_them(size: int, text: str) -> None:
    assert format_bytes(size) == text


def test_the_localai_routes_need_the_same_sign_in_and_permission(gallery: Any) -> None:
    install(make_backend(gallery, "locked"))
    anonymous = client_for(None)
    reader = client_for(make_user("reader"))

    assert anonymous.get("/backends/upgrades").status_code == 401
    assert anonymous.get("/backends/upgrades").json()["error"]["code"] == 401
    assert reader.get("/backends/upgrades").status_code == 200
    assert reader.post("/backends/upgrade/locked").status_code == 403
    assert reader.post("/backends/upgrades/check").status_code == 403
    assert not UpgradeJob.objects.exists()


@pytest.mark.parametrize("header", ["HTTP_X_API_KEY", "HTTP_XI_API_KEY"])
def test_a_token_in_localais_api_key_headers_signs_in_and_a_wrong_one_is_refused(
    header: str, user: Any, gallery: Any
) -> None:
    install(make_backend(gallery, "cpu-whisper"))
    token, _ = Token.objects.get_or_create(user=user)
    client = APIClient()

    client.credentials(**{header: token.key})
    assert client.get("/backends/upgrades").status_code == 200
    assert client.post("/backends/upgrade/cpu-whisper").status_code == 200  # a write, no CSRF token
    assert UpgradeJob.objects.filter(kind="upgrade", backend__name="cpu-whisper").exists()
    assert client.get("/api/v1/backends/").status_code == 200  # the portal's own API too

    client.credentials(**{header: "not-" + token.key})
    refused = client.get("/backends/upgrades")
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "Invalid token."
