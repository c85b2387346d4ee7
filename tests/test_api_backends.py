"""The backends endpoints: listing, filters, one backend, and the verbs that queue jobs."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from backends_app.models import (
    Backend,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    OperationRefused,
    UpgradeJob,
)
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
def operator() -> Any:
    return make_user("alice", perms=(OPERATE,))


@pytest.fixture
def api(operator: Any) -> Any:
    return client_for(operator)


@pytest.fixture
def gallery() -> Any:
    return make_gallery("main")


def names(response: Any) -> list[str]:
    return [row["name"] for row in response.json()["results"]]


def test_a_backend_shows_what_is_installed_where_and_what_the_check_found(api: Any, gallery: Any) -> None:
    backend = make_backend(gallery, "cpu-llama-cpp", version="1.2", mirrors=["docker.io/x/y:z"])
    flag_upgrade(backend, version="1.3")
    install(backend, version="1.2", kept=2)
    other = Node.objects.create(name="gpu-box", backends_path="/srv/backends")
    install(backend, other, version="1.1")

    body = api.get("/api/v1/backends/cpu-llama-cpp/").json()

    assert body["ref"] == "main@cpu-llama-cpp"
    assert body["url"].endswith("/api/v1/backends/main@cpu-llama-cpp/")
    assert body["gallery"] == "main"
    assert body["declared_version"] == "1.2"
    assert body["mirrors"] == ["docker.io/x/y:z"]
    assert body["available_version"] == "1.3"
    assert body["upgrade_available"] is True and body["upgrade_reason"]
    assert body["pinned"] is False and body["active_job"] is None
    installed = {row["node"]: row for row in body["installed"]}
    assert installed["test-node"]["version"] == "1.2"
    assert installed["test-node"]["kept_versions"] == 2
    assert installed["test-node"]["state"] == "current"
    assert installed["gpu-box"]["version"] == "1.1" and installed["gpu-box"]["kept_versions"] == 0


def test_the_list_holds_only_the_first_entry_of_a_duplicated_name(api: Any, gallery: Any) -> None:
    make_backend(gallery, "whisper")
    make_backend(gallery, "whisper", occurrence=1, uri="quay.io/other:tag")

    body = api.get("/api/v1/backends/").json()

    assert body["count"] == 1
    assert body["results"][0]["uri"] == "quay.io/example/backends:whisper"


def test_filters_narrow_the_list(api: Any, gallery: Any) -> None:
    second = make_gallery("extra")
    flagged = flag_upgrade(make_backend(gallery, "flagged"))
    pinned = make_backend(gallery, "pinned-one", pinned=True)
    install(flagged)
    install(pinned)
    make_backend(gallery, "never-installed")
    make_backend(second, "elsewhere")
    remote = Node.objects.create(name="remote", backends_path="/srv/b")
    install(make_backend(gallery, "remote-only"), remote)

    assert names(api.get("/api/v1/backends/?upgrade_available=true")) == ["flagged"]
    assert names(api.get("/api/v1/backends/?pinned=true")) == ["pinned-one"]
    assert set(names(api.get("/api/v1/backends/?installed=true"))) == {"flagged", "pinned-one", "remote-only"}
    assert set(names(api.get("/api/v1/backends/?installed=false"))) == {"never-installed", "elsewhere"}
    assert names(api.get("/api/v1/backends/?node=remote")) == ["remote-only"]
    assert set(names(api.get("/api/v1/backends/?node=remote&installed=false"))) == {
        "flagged",
        "pinned-one",
        "never-installed",
        "elsewhere",
    }
    assert names(api.get("/api/v1/backends/?gallery=extra")) == ["elsewhere"]
    assert names(api.get("/api/v1/backends/?search=PINNED")) == ["pinned-one"]
    assert names(api.get("/api/v1/backends/?node=no-such-node")) == []


@pytest.mark.parametrize(
    "query",
    [
        "upgrade_available=maybe",
        "installed=2",
        "pinned=",
        "page_size=0",
        "page_size=1001",
        "page_size=ten",
        "page=",
        "page=0",
        "page=last",
    ],
)
def test_a_malformed_filter_is_a_400_that_names_it(api: Any, gallery: Any, query: str) -> None:
    response = api.get(f"/api/v1/backends/?{query}")

    assert response.status_code == 400
    assert query.split("=")[0] in response.json()


def test_the_list_is_paginated_with_a_page_size_parameter(api: Any, gallery: Any) -> None:
    for index in range(5):
        make_backend(gallery, f"b{index}")

    first = api.get("/api/v1/backends/?page_size=2").json()
    last = api.get("/api/v1/backends/?page_size=2&page=3").json()

    assert first["count"] == 5 and len(first["results"]) == 2 and first["next"]
    assert [row["name"] for row in last["results"]] == ["b4"] and last["next"] is None
    assert api.get("/api/v1/backends/?page=99").status_code == 404


def test_listing_costs_the_same_few_queries_at_one_and_at_a_thousand_backends(
    api: Any, gallery: Any, django_assert_max_num_queries: Any
) -> None:
    nodes = [Node.local(), *(Node.objects.create(name=f"n{i}", backends_path=f"/b{i}") for i in range(2))]

    def add_backends(count: int, start: int) -> None:
        rows = Backend.objects.bulk_create(
            [Backend(gallery=gallery, name=f"backend-{start + i:04d}", uri="q/x:y") for i in range(count)]
        )
        now = timezone.now()
        InstalledVersion.objects.bulk_create(
            [
                InstalledVersion(
                    node=node,
                    backend=row,
                    name=row.name,
                    version="1",
                    installed_at=now,
                    path=f"/p/{row.name}",
                )
                for row in rows
                for node in nodes
            ]
            + [
                InstalledVersion(
                    node=nodes[0],
                    backend=row,
                    name=row.name,
                    state="kept",
                    version="0",
                    path=f"/k/{row.name}",
                )
                for row in rows
            ]
        )
        UpgradeJob.objects.bulk_create(
            [UpgradeJob(kind=JobKind.UPGRADE, backend=row, node=nodes[1]) for row in rows]
        )

    def list_everything() -> tuple[int, dict[str, Any]]:
        with CaptureQueriesContext(connection) as queries, django_assert_max_num_queries(6):
            body = api.get("/api/v1/backends/?page_size=1000").json()
        return len(queries), body

    add_backends(1, 0)
    at_one, body = list_everything()
    assert body["count"] == 1 and len(body["results"][0]["installed"]) == 3

    add_backends(999, 1)
    at_thousand, body = list_everything()
    assert body["count"] == 1000 and all(row["active_job"] for row in body["results"])
    assert at_one == at_thousand


def test_a_name_in_two_galleries_needs_the_gallery_prefix(api: Any, gallery: Any) -> None:
    make_backend(gallery, "piper")
    make_backend(make_gallery("extra"), "piper", version="9")

    ambiguous = api.get("/api/v1/backends/piper/")
    exact = api.get("/api/v1/backends/extra@piper/")

    assert ambiguous.status_code == 400
    assert "main@piper" in ambiguous.json()["detail"] and "extra@piper" in ambiguous.json()["detail"]
    assert exact.status_code == 200 and exact.json()["declared_version"] == "9"


@pytest.mark.parametrize("name", ["no-such-backend", "nope@piper", "a.b.c", "with%20space", "nul%00char"])
def test_an_unknown_backend_is_a_404_with_its_name(api: Any, gallery: Any, name: str) -> None:
    make_backend(gallery, "piper")

    response = api.get(f"/api/v1/backends/{name}/")
    posted = api.post(f"/api/v1/backends/{name}/install/", {}, format="json")

    assert response.status_code == 404 and posted.status_code == 404
    assert response.json()["detail"]


def test_install_queues_a_job_and_answers_202_with_it(api: Any, gallery: Any) -> None:
    make_backend(gallery, "kokoro")

    response = api.post("/api/v1/backends/kokoro/install/", {}, format="json")

    assert response.status_code == 202
    job = response.json()
    assert job["kind"] == "install" and job["status"] == "queued" and job["backend"] == "kokoro"
    assert job["node"] == "test-node" and job["requested_by"] == "api:alice"
    assert job["url"].endswith(f"/api/v1/jobs/{job['id']}/")
    assert response["Location"] == job["url"]
    row = UpgradeJob.objects.get(pk=job["id"])
    assert row.status == JobStatus.QUEUED  # nothing runs it in the tests


def test_a_second_request_on_the_same_backend_gets_409_with_the_first_job(api: Any, gallery: Any) -> None:
    install(make_backend(gallery, "bark"))

    first = api.post("/api/v1/backends/bark/upgrade/", {}, format="json")
    second = api.post("/api/v1/backends/bark/uninstall/", {}, format="json")

    assert first.status_code == 202
    assert second.status_code == 409
    assert second.json()["code"] == "active_job"
    assert second.json()["job"]["id"] == first.json()["id"]
    assert UpgradeJob.objects.count() == 1


def test_upgrading_a_pinned_backend_is_refused_unless_forced(api: Any, gallery: Any) -> None:
    install(make_backend(gallery, "stable", pinned=True))

    refused = api.post("/api/v1/backends/stable/upgrade/", {}, format="json")
    forced = api.post("/api/v1/backends/stable/upgrade/", {"force": True}, format="json")

    assert refused.status_code == 409
    assert refused.json() == {"detail": "stable is pinned; unpin it or force the upgrade", "code": "refused"}
    assert forced.status_code == 202 and forced.json()["force"] is True


@pytest.mark.parametrize(
    ("verb", "message"),
    [
        ("upgrade", "not installed"),
        ("rollback", "not installed"),
        ("uninstall", "not installed"),
    ],
)
def test_a_verb_on_a_backend_that_is_not_installed_is_refused(
    api: Any, gallery: Any, verb: str, message: str
) -> None:
    make_backend(gallery, "absent")

    response = api.post(f"/api/v1/backends/absent/{verb}/", {}, format="json")

    assert response.status_code == 409
    assert message in response.json()["detail"] and response.json()["code"] == "refused"
    assert not UpgradeJob.objects.exists()


@pytest.mark.parametrize("latest_digest", ["", "sha256:" + "c" * 64])
def test_converging_a_backend_installed_nowhere_is_refused_not_a_server_error(
    api: Any, gallery: Any, latest_digest: str
) -> None:
    backend = make_backend(gallery, "absent", latest_digest=latest_digest)

    response = api.post("/api/v1/backends/absent/converge/")

    assert response.status_code == 409, response.content
    assert response.json() == {"detail": "absent is not installed on any node", "code": "refused"}
    assert not UpgradeJob.objects.exists()
    with pytest.raises(OperationRefused) as refused:
        backend.converge(requested_by="test")
    assert refused.value.reason == "not_installed"


def test_rollback_needs_a_kept_version(api: Any, gallery: Any) -> None:
    install(make_backend(gallery, "nothing-kept"))
    install(make_backend(gallery, "one-kept"), kept=1)

    refused = api.post("/api/v1/backends/nothing-kept/rollback/", {}, format="json")
    queued = api.post("/api/v1/backends/one-kept/rollback/", {}, format="json")

    assert refused.status_code == 409 and "no kept version" in refused.json()["detail"]
    assert queued.status_code == 202 and queued.json()["kind"] == "rollback"
    assert queued.json()["from_version"] == "1.0"


def test_a_verb_can_target_another_node_by_name(api: Any, gallery: Any) -> None:
    remote = Node.objects.create(name="remote", backends_path="/srv/b")
    install(make_backend(gallery, "spread"), remote)

    response = api.post("/api/v1/backends/spread/upgrade/", {"node": "remote"}, format="json")

    assert response.status_code == 202 and response.json()["node"] == "remote"


@pytest.mark.parametrize(
    ("body", "content_type", "field"),
    [
        ('{"node": "atlantis"}', "application/json", "node"),
        ('{"force": "perhaps"}', "application/json", "force"),
        ('{"node": 12345678901234567890123}', "application/json", None),
        ('{"force": tru', "application/json", "detail"),
        ("[1, 2, 3]", "application/json", "non_field_errors"),
        ('"just a string"', "application/json", "non_field_errors"),
        ('{"node": "' + "x" * 300 + '"}', "application/json", "node"),
        ("<xml/>", "application/xml", "detail"),
        ("[" * 100_000, "application/json", "detail"),
        ('{"force": true, "node": "\\u0000"}', "application/json", "node"),
        ("\udcff{}".encode("utf-8", "surrogateescape"), "application/json", "detail"),
    ],
)
def test_bad_input_to_a_verb_is_a_400_and_queues_nothing(
    api: Any, gallery: Any, body: str | bytes, content_type: str, field: str | None
) -> None:
    install(make_backend(gallery, "careful"))

    response = api.generic("POST", "/api/v1/backends/careful/upgrade/", body, content_type=content_type)

    assert response.status_code in (400, 415)
    if field:
        assert field in response.json()
    assert not UpgradeJob.objects.exists()


def test_pin_and_unpin_answer_with_the_backend(api: Any, gallery: Any) -> None:
    backend = make_backend(gallery, "steady")

    pinned = api.post("/api/v1/backends/steady/pin/")
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    backend.refresh_from_db()
    assert backend.pinned

    unpinned = api.post("/api/v1/backends/main@steady/unpin/")
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False
    backend.refresh_from_db()
    assert not backend.pinned


def test_a_backend_gone_from_its_gallery_cannot_be_installed(api: Any, gallery: Any) -> None:
    make_backend(gallery, "vanished", gone=True)

    response = api.post("/api/v1/backends/vanished/install/", {}, format="json")

    assert response.status_code == 409 and "no longer in gallery" in response.json()["detail"]
