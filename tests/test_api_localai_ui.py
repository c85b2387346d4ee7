"""LocalAI's routes beyond its own tests: the shapes its web UI and clients read (contract: LocalAI's
core/http/routes/ui_api.go and core/http/endpoints/localai/backend.go at 82c191a), the error families,
sign-in and CSRF, trailing slashes, and what the portal does differently on purpose."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from backends_app import jobs, procedure
from backends_app.models import (
    Backend,
    Gallery,
    InstalledVersion,
    JobKind,
    JobPhase,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)
from tests.conftest import run_op
from tests.helpers.api import OPERATE, client_for, install, make_backend, make_gallery, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> Any:
    return client_for(make_user("operator", perms=(OPERATE,)), keyword="Bearer")


@pytest.fixture
def gallery() -> Gallery:
    return make_gallery("main")


def entry_row(gallery: Gallery, name: str, position: int, **fields: Any) -> Backend:
    """A gallery entry as a sync stores it (the raw entry too)."""
    raw = {"name": name, **{k: v for k, v in fields.items() if k in ("tags", "urls", "uri", "capabilities")}}
    fields.pop("urls", None)  # kept in the raw entry only, as a sync stores it
    fields.setdefault("uri", "" if fields.get("capabilities") else f"quay.io/example/backends:{name}")
    fields.setdefault("is_meta", bool(fields.get("capabilities")) and not fields["uri"])
    return make_backend(gallery, name, position=position, entry=raw, **fields)


# --- GET /api/backends: the catalog ----------------------------------------------------------------------


@pytest.fixture
def catalog(gallery: Gallery) -> dict[str, Backend]:
    rows = {
        "llama-cpp": entry_row(
            gallery,
            "llama-cpp",
            0,
            capabilities={"nvidia": "cuda12-llama-cpp", "default": "cpu-llama-cpp"},
            tags=["LLM", "text"],
            description="LLM inference in C/C++",
        ),
        "cpu-llama-cpp": entry_row(
            gallery, "cpu-llama-cpp", 1, tags=["text"], license="MIT", alias="llama-cpp"
        ),
        "cuda12-llama-cpp": entry_row(gallery, "cuda12-llama-cpp", 2, tags=["text"], license="MIT"),
        "piper": entry_row(gallery, "piper", 3, tags=["TTS"], license="", urls=["https://piper.example"]),
        "whisper-development": entry_row(gallery, "whisper-development", 4, license="apache-2.0"),
    }
    install(rows["cpu-llama-cpp"]).__class__.objects.filter(name="cpu-llama-cpp").update(alias="llama-cpp")
    return rows


def catalog_page(api: Any, **params: Any) -> dict[str, Any]:
    response = api.get("/api/backends", params)
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    return dict(response.json())


def test_the_catalog_answers_localais_keys_in_go_map_order(api: Any, catalog: dict[str, Backend]) -> None:
    body = catalog_page(api, items=9999)

    assert (
        list(body)
        == sorted(body)
        == [
            "allTags",
            "availableBackends",
            "backends",
            "currentPage",
            "installedBackends",
            "nextPage",
            "preferDevelopmentBackends",
            "prevPage",
            "processingBackends",
            "repositories",
            "systemCapability",
            "taskTypes",
            "totalPages",
        ]
    )
    meta = next(b for b in body["backends"] if b["name"] == "llama-cpp")
    assert list(meta) == sorted(meta)
    assert list(meta["capabilities"]) == ["default", "nvidia"]  # a Go map: keys in byte order
    assert meta == {
        "capabilities": {"default": "cpu-llama-cpp", "nvidia": "cuda12-llama-cpp"},
        "description": "LLM inference in C/C++",
        "gallery": "main",
        "icon": "",
        "id": "main@llama-cpp",
        "installed": True,  # an installed concrete's alias counts, as in LocalAI's listing
        "isAlias": False,
        "isDeletion": False,
        "isDevelopment": False,
        "isMeta": True,
        "jobID": "",
        "license": "",
        "metaBackendFor": "",
        "name": "llama-cpp",
        "nodes": None,
        "processing": False,
        "tags": ["LLM", "text"],
        "urls": None,
        "version": "1.0",
    }
    assert body["repositories"] == [
        {
            "url": "github:mudler/LocalAI/backend/index.yaml@master",
            "name": "localai",
        },  # seeded, never synced here
        {"url": "https://galleries.invalid/main/index.yaml", "name": "main"},
    ]
    assert body["allTags"] == ["LLM", "TTS", "text"]
    assert body["systemCapability"] == "default" and body["preferDevelopmentBackends"] is False
    # The installed listing counts the directory and its alias, as LocalAI's ListBackends does.
    assert body["installedBackends"] == 2


def test_the_catalog_says_when_development_builds_are_preferred(
    api: Any, catalog: dict[str, Backend]
) -> None:
    path = PortalSettings.runtime_settings_path()
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"prefer_development_backends": true}')  # as LocalAI's settings page writes it

    assert catalog_page(api)["preferDevelopmentBackends"] is True


def test_the_catalog_marks_concretes_of_a_meta_and_development_builds(
    api: Any, catalog: dict[str, Backend]
) -> None:
    rows = {b["name"]: b for b in catalog_page(api, items=9999)["backends"]}

    assert rows["cpu-llama-cpp"]["isAlias"] is True and rows["cpu-llama-cpp"]["metaBackendFor"] == "llama-cpp"
    assert rows["cpu-llama-cpp"]["installed"] is True and rows["cuda12-llama-cpp"]["installed"] is False
    assert rows["piper"]["isAlias"] is False and rows["piper"]["urls"] == ["https://piper.example"]
    assert (
        rows["whisper-development"]["isDevelopment"] is True and rows["whisper-development"]["tags"] is None
    )


def test_the_catalog_pages_as_localai_does(api: Any, catalog: dict[str, Backend]) -> None:
    first = catalog_page(api)  # 9 a page by default
    second = catalog_page(api, page=2, items=2)
    past = catalog_page(api, page=7, items=2)
    junk = catalog_page(api, page="x", items="-3")

    assert (first["currentPage"], first["totalPages"], first["prevPage"], first["nextPage"]) == (1, 1, 1, 1)
    assert [b["name"] for b in second["backends"]] == ["cuda12-llama-cpp", "piper"]
    assert (second["totalPages"], second["prevPage"], second["nextPage"]) == (3, 1, 3)
    assert past["backends"] == [] and past["currentPage"] == 7 and past["nextPage"] == 3
    assert junk["currentPage"] == 1 and len(junk["backends"]) == 5
    assert first["availableBackends"] == 5


def test_the_catalog_sorts_searches_and_filters_by_tag(api: Any, catalog: dict[str, Backend]) -> None:
    def names(**params: Any) -> list[str]:
        return [b["name"] for b in catalog_page(api, items=9999, **params)["backends"]]

    assert names(sort="name", order="desc") == sorted(names(), reverse=True)
    assert names(sort="license")[-2:] == ["llama-cpp", "piper"]  # no license: last
    assert names(sort="status")[:2] == ["cpu-llama-cpp", "llama-cpp"]  # installed first
    assert names(sort="anything") == names()  # the galleries' order
    assert names(term="lcp") == ["llama-cpp", "cpu-llama-cpp", "cuda12-llama-cpp"]  # in order: a fuzzy match
    assert names(term="C/C++") == ["llama-cpp"]  # in the description
    assert names(term="tts") == ["piper"]  # in the tags
    assert names(tag="tts") == ["piper"]  # any case
    assert catalog_page(api, tag="tts")["availableBackends"] == 1
    assert catalog_page(api, tag="tts")["allTags"] == ["LLM", "TTS", "text"]  # of every entry


def test_a_backend_with_an_operation_under_way_reads_as_processing(
    api: Any, catalog: dict[str, Backend]
) -> None:
    job = UpgradeJob.objects.create(kind=JobKind.UNINSTALL, backend=catalog["piper"], node=Node.local())

    body = catalog_page(api, items=9999)

    piper = next(b for b in body["backends"] if b["name"] == "piper")
    assert (piper["processing"], piper["jobID"], piper["isDeletion"]) == (True, str(job.uuid), True)
    assert body["processingBackends"] == {"main@piper": str(job.uuid)}
    assert body["taskTypes"] == {"main@piper": "Deletion"}


def test_later_duplicates_of_a_name_are_dropped_from_the_page(api: Any, gallery: Gallery) -> None:
    entry_row(gallery, "piper", 0)
    make_backend(gallery, "piper", occurrence=1, position=1)

    body = catalog_page(api)

    assert [b["id"] for b in body["backends"]] == ["main@piper"]
    assert body["availableBackends"] == 2  # counted before the page drops it, as LocalAI


# --- operations on backends from the UI -------------------------------------------------------------------


def test_install_reinstalls_and_a_second_click_follows_the_same_job(api: Any, gallery: Gallery) -> None:
    backend = make_backend(gallery, "piper")
    install(backend)

    first = api.post("/api/backends/install/piper", {}, format="json")
    again = api.post("/api/backends/install/main@piper", {}, format="json")

    assert first.status_code == 200
    assert first.json() == {"jobID": first.json()["jobID"], "message": "Backend installation started"}
    job = UpgradeJob.objects.get(uuid=first.json()["jobID"])
    assert (job.kind, job.status, job.requested_by) == (JobKind.INSTALL, JobStatus.QUEUED, "api:operator")
    assert again.json()["jobID"] == first.json()["jobID"]
    assert UpgradeJob.objects.count() == 1


@pytest.mark.parametrize(
    ("path", "code", "fragment"),
    [
        ("/api/backends/install/ghost", 404, "no backend named 'ghost'"),
        ("/api/backends/delete/absent", 409, "absent is not installed"),
        ("/api/backends/upgrade/pinned", 409, "pinned is pinned"),
        ("/api/backends/upgrade/twice", 400, "several galleries"),
        ("/api/backends/system/delete/ghost", 404, "no backend named 'ghost'"),
    ],
)
def test_a_ui_route_answers_its_refusals_in_the_uis_flat_error_shape(
    api: Any, gallery: Gallery, path: str, code: int, fragment: str
) -> None:
    make_backend(gallery, "absent")
    install(make_backend(gallery, "pinned", pinned=True))
    make_backend(gallery, "twice")
    make_backend(make_gallery("other"), "twice")

    response = api.post(path, {}, format="json")

    assert response.status_code == code
    assert list(response.json()) == ["error"] and fragment in response.json()["error"]
    assert not UpgradeJob.objects.exists()


def test_delete_queues_an_uninstall(api: Any, gallery: Gallery) -> None:
    install(make_backend(gallery, "piper"))

    response = api.post("/api/backends/delete/main@piper")

    assert response.status_code == 200 and response.json()["message"] == "Backend deletion started"
    assert UpgradeJob.objects.get(uuid=response.json()["jobID"]).kind == JobKind.UNINSTALL


def test_upgrade_answers_localais_fields_with_a_relative_status_url(api: Any, gallery: Gallery) -> None:
    install(make_backend(gallery, "piper"))

    body = api.post("/api/backends/upgrade/piper", content_type="application/json").json()

    job = UpgradeJob.objects.get(kind=JobKind.UPGRADE)
    assert body == {
        "jobID": str(job.uuid),
        "message": "Backend upgrade started",
        "statusUrl": f"/api/backends/job/{job.uuid}",
        "uuid": str(job.uuid),
    }
    assert list(body) == sorted(body)


def on_disk(settings: Any, name: str, metadata: dict[str, str] | None = None) -> Path:
    directory = Path(settings.PORTAL_BACKENDS_PATH) / name
    directory.mkdir(parents=True)
    (directory / "run.sh").write_text("#!/bin/sh\n")
    (directory / "run.sh").chmod(0o755)
    if metadata is not None:
        (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


def test_system_delete_uninstalls_before_it_answers(api: Any, gallery: Gallery, settings: Any) -> None:
    make_backend(gallery, "piper")
    directory = on_disk(settings, "piper", {"name": "piper"})
    procedure.record_disk_state(Node.local())
    assert InstalledVersion.objects.filter(name="piper").exists()

    response = api.post("/api/backends/system/delete/piper")

    assert response.status_code == 200
    assert response.json() == {"message": "Backend deleted successfully", "success": True}
    assert not directory.exists()
    assert not InstalledVersion.objects.filter(name="piper").exists()
    job = UpgradeJob.objects.get()
    assert (job.kind, job.status) == (JobKind.UNINSTALL, JobStatus.SUCCEEDED)


def test_system_delete_of_a_backend_not_installed_is_refused(api: Any, gallery: Gallery) -> None:
    make_backend(gallery, "piper")

    response = api.post("/api/backends/system/delete/piper")

    assert response.status_code == 409 and "not installed" in response.json()["error"]


# --- GET /api/backends/job/<uid> ----------------------------------------------------------------------------


def job_state(api: Any, job: UpgradeJob) -> dict[str, Any]:
    body = api.get(f"/api/backends/job/{job.uuid}").json()
    assert list(body) == sorted(body)
    return dict(body)


def test_a_jobs_state_reads_as_localai_writes_it_at_each_stage(api: Any, gallery: Gallery) -> None:
    backend = make_backend(gallery, "piper")
    job = UpgradeJob.objects.create(kind=JobKind.INSTALL, backend=backend, node=Node.local())
    common = {"deletion": False, "galleryElementName": "piper", "queued": False}

    queued = job_state(api, job)
    job.start()
    job.set_progress(512, 1024, "layer 1/2")
    running = job_state(api, job)
    job.finish("piper installed")
    done = job_state(api, job)

    assert queued == {**common, "message": "queued", "processed": False, "progress": 0.0}
    assert running == {**common, "message": "layer 1/2", "processed": False, "progress": 50.0}
    assert done == {**common, "completed": True, "message": "completed", "processed": True, "progress": 100.0}


def test_a_failed_or_cancelled_job_reads_as_localai_writes_it(api: Any, gallery: Gallery) -> None:
    backend = make_backend(gallery, "piper")
    failed = UpgradeJob.objects.create(
        kind=JobKind.UNINSTALL, backend=backend, status=JobStatus.FAILED, error="disk full"
    )
    cancelled = UpgradeJob.objects.create(kind=JobKind.INSTALL, backend=backend, status=JobStatus.CANCELLED)

    assert job_state(api, failed) == {
        "deletion": True,
        "error": "disk full",
        "galleryElementName": "piper",
        "message": "error: disk full",
        "processed": True,
        "progress": 0.0,
        "queued": False,
    }
    state = job_state(api, cancelled)
    assert (state["message"], state["processed"]) == ("cancelled", True)
    assert "error" not in state and "completed" not in state


# --- POST /api/backends/install-external ------------------------------------------------------------------


def external(api: Any, **body: str) -> Any:
    return api.post("/api/backends/install-external", body, format="json")


def test_an_external_image_is_installed_from_a_gallery_kept_for_external_installs(api: Any) -> None:
    response = external(api, uri="registry.example:5000/team/my-backend:1.2", name="mine", alias="my")

    assert response.status_code == 200
    job = UpgradeJob.objects.get(uuid=response.json()["jobID"])
    backend = job.backend
    assert (backend.gallery.name, backend.gallery.enabled, backend.gallery.url) == ("external", False, "")
    assert (backend.name, backend.uri, backend.alias) == (
        "mine",
        "registry.example:5000/team/my-backend:1.2",
        "my",
    )
    # Not a gallery a client lists or syncs.
    assert [g["name"] for g in api.get("/backends/galleries").json()] == ["localai"]
    assert "mine" not in [b["name"] for b in api.get("/api/backends", {"items": 9999}).json()["backends"]]


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("https://example.org/backends/piper-cpu.tar.gz", "piper-cpu"),
        ("file:///srv/backends/piper.tgz", "piper"),
        ("/srv/backends/piper-dir/", "piper-dir"),
    ],
)
def test_a_directory_or_an_archive_is_passed_to_the_procedure_named_after_its_file(
    api: Any, uri: str, name: str
) -> None:
    response = external(api, uri=uri)

    assert response.status_code == 200
    backend = UpgradeJob.objects.get(uuid=response.json()["jobID"]).backend
    assert (backend.name, backend.uri) == (name, uri)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"uri": "oci://quay.io/example/backend:latest"}, "specifying a name is required for OCI images"),
        ({"uri": "piper", "name": "x"}, "specifying a name or alias is not supported for gallery backends"),
        ({"uri": "oci://Not A Ref", "name": "x"}, "invalid"),
        ({"uri": "/srv/x", "name": "../escape"}, "not a single directory name"),
        ({"uri": "   "}, "uri is required"),
        ({"uri": "ocifile:///srv/images/piper.tar"}, "ocifile:// (an image tarball on disk) is not"),
        ({"uri": "/srv/x", "colour": "red"}, "colour: Unknown field"),
    ],
)
def test_an_external_source_the_portal_cannot_take_is_a_400(
    api: Any, body: dict[str, str], error: str
) -> None:
    response = api.post("/api/backends/install-external", body, format="json")

    assert response.status_code == 400
    assert error in response.json()["error"]
    assert not Backend.objects.filter(gallery__name="external").exists()


def test_a_gallery_backends_name_installs_it_from_its_gallery(api: Any, gallery: Gallery) -> None:
    backend = make_backend(gallery, "piper")

    response = external(api, uri="piper")

    assert response.status_code == 200
    assert UpgradeJob.objects.get(uuid=response.json()["jobID"]).backend == backend


def test_installing_the_same_external_name_again_follows_the_job_under_way(api: Any) -> None:
    first = external(api, uri="oci://quay.io/example/a:1", name="mine")
    second = external(api, uri="oci://quay.io/example/b:2", name="mine")

    assert second.json()["jobID"] == first.json()["jobID"]
    assert Backend.objects.get(name="mine").uri == "oci://quay.io/example/a:1"  # not changed under the job


def test_a_followed_gallery_named_external_is_not_taken_over(api: Any) -> None:
    make_gallery("external")

    response = external(api, uri="oci://quay.io/example/a:1", name="mine")

    assert response.status_code == 409 and "rename the gallery" in response.json()["error"]


# --- /api/operations --------------------------------------------------------------------------------------


def test_operations_are_sorted_by_progress_then_id_and_leave_the_list_when_they_end(
    api: Any, gallery: Gallery
) -> None:
    node = Node.local()
    slow = UpgradeJob.objects.create(
        kind=JobKind.UPGRADE,
        backend=make_backend(gallery, "b"),
        node=node,
        status=JobStatus.RUNNING,
        percent=70,
    )
    UpgradeJob.objects.create(kind=JobKind.INSTALL, backend=make_backend(gallery, "c"), node=node)
    UpgradeJob.objects.create(kind=JobKind.INSTALL, backend=make_backend(gallery, "a"), node=node)
    UpgradeJob.objects.create(kind=JobKind.CHECK)  # a check is no backend operation

    listed = api.get("/api/operations").json()["operations"]
    slow.start()
    slow.finish("done")
    after = api.get("/api/operations").json()["operations"]

    assert [(op["id"], op["progress"]) for op in listed] == [("main@a", 0), ("main@c", 0), ("main@b", 70)]
    assert all(list(op) == sorted(op) for op in listed)
    assert listed[0]["taskType"] == "Installation" and listed[0]["message"] == "queued"
    assert [op["id"] for op in after] == ["main@a", "main@c"]


def test_cancel_stops_a_queued_operation_and_says_so_when_asked_twice(api: Any, gallery: Gallery) -> None:
    job = UpgradeJob.objects.create(
        kind=JobKind.INSTALL, backend=make_backend(gallery, "a"), node=Node.local()
    )

    first = api.post(f"/api/operations/{job.uuid}/cancel")
    second = api.post(f"/api/operations/{job.uuid}/cancel")

    assert first.status_code == 200 and first.json() == {"message": "Operation cancelled", "success": True}
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert second.status_code == 400
    assert second.json() == {"error": f'operation "{job.uuid}" not found or already completed'}


def test_a_running_operation_is_asked_to_stop_and_one_past_its_swap_cannot_be(
    api: Any, gallery: Gallery
) -> None:
    node = Node.local()
    downloading = UpgradeJob.objects.create(
        kind=JobKind.UPGRADE,
        backend=make_backend(gallery, "a"),
        node=node,
        status=JobStatus.RUNNING,
        phase=JobPhase.DOWNLOADING,
    )
    swapping = UpgradeJob.objects.create(
        kind=JobKind.UPGRADE,
        backend=make_backend(gallery, "b"),
        node=node,
        status=JobStatus.RUNNING,
        phase=JobPhase.SWAPPING,
    )

    asked = api.post(f"/api/operations/{downloading.uuid}/cancel")
    again = api.post(f"/api/operations/{downloading.uuid}/cancel")
    refused = api.post(f"/api/operations/{swapping.uuid}/cancel")

    assert asked.status_code == 200
    downloading.refresh_from_db()
    assert downloading.cancel_requested is True
    assert again.json() == {"error": f'operation "{downloading.uuid}" is already cancelled'}
    assert refused.status_code == 400 and "can no longer be cancelled" in refused.json()["error"]
    swapping.refresh_from_db()
    assert swapping.cancel_requested is False


def test_dismiss_always_answers_success(api: Any) -> None:
    response = api.post("/api/operations/whatever/dismiss")

    assert response.status_code == 200
    assert response.json() == {"message": "Operation dismissed", "success": True}


def test_history_lists_finished_operations_as_localais_op_record(api: Any, gallery: Gallery) -> None:
    job = UpgradeJob.objects.create(
        kind=JobKind.UPGRADE,
        backend=make_backend(gallery, "piper"),
        node=Node.local(),
        status=JobStatus.ROLLED_BACK,
        error="health check failed; rolled back",
        started_at=timezone.datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=dt.UTC),
        finished_at=timezone.datetime(2026, 1, 2, 3, 4, 9, tzinfo=dt.UTC),
    )

    (record,) = api.get("/api/operations/history").json()["operations"]

    assert record == {
        "id": "main@piper",
        "name": "piper",
        "jobID": str(job.uuid),
        "isBackend": True,
        "taskType": "installation",
        "outcome": "failed",
        "error": "health check failed; rolled back",
        "startedAt": "2026-01-02T03:04:05.12Z",
        "finishedAt": "2026-01-02T03:04:09Z",
    }


# --- the REST family -----------------------------------------------------------------------------------


def test_installed_backends_are_listed_as_localais_system_backends(
    api: Any, gallery: Gallery, settings: Any
) -> None:
    backends = Path(settings.PORTAL_BACKENDS_PATH)
    make_backend(gallery, "cpu-llama-cpp")
    make_backend(gallery, "llama-cpp", is_meta=True, uri="", capabilities={"default": "cpu-llama-cpp"})
    on_disk(
        settings,
        "cpu-llama-cpp",
        {
            "alias": "llama-cpp",
            "name": "cpu-llama-cpp",
            "installed_at": "2026-01-02T03:04:05Z",
            "digest": "sha256:ab",
        },
    )
    (backends / "llama-cpp").mkdir()
    (backends / "llama-cpp" / "metadata.json").write_text(
        json.dumps({"meta_backend_for": "cpu-llama-cpp", "name": "llama-cpp"})
    )
    on_disk(settings, "hand-made")  # no metadata.json
    procedure.record_disk_state(Node.local())

    listing = {row["Name"]: row for row in api.get("/backends").json()}

    concrete = {
        "Name": "cpu-llama-cpp",
        "RunFile": f"{backends}/cpu-llama-cpp/run.sh",
        "IsMeta": False,
        "IsSystem": False,
        "Metadata": {
            "alias": "llama-cpp",
            "name": "cpu-llama-cpp",
            "installed_at": "2026-01-02T03:04:05Z",
            "digest": "sha256:ab",
        },
    }
    assert listing["cpu-llama-cpp"] == concrete
    assert list(listing["cpu-llama-cpp"]) == ["Name", "RunFile", "IsMeta", "IsSystem", "Metadata"]
    assert list(listing["cpu-llama-cpp"]["Metadata"]) == ["alias", "name", "installed_at", "digest"]
    # The alias row is the concrete's, written over the meta of the same name, as LocalAI lists it.
    assert listing["llama-cpp"] == {**concrete, "Name": "llama-cpp"}
    assert listing["hand-made"]["Metadata"] == {"name": "hand-made"}
    assert sorted(listing) == ["cpu-llama-cpp", "hand-made", "llama-cpp"]


def test_a_meta_backend_without_an_alias_row_is_listed_as_meta(
    api: Any, gallery: Gallery, settings: Any
) -> None:
    backends = Path(settings.PORTAL_BACKENDS_PATH)
    on_disk(settings, "cpu-whisper", {"name": "cpu-whisper"})
    (backends / "whisper").mkdir()
    (backends / "whisper" / "metadata.json").write_text(
        json.dumps({"meta_backend_for": "cpu-whisper", "name": "whisper"})
    )
    procedure.record_disk_state(Node.local())

    row = next(r for r in api.get("/backends").json() if r["Name"] == "whisper")

    assert (row["IsMeta"], row["RunFile"]) == (True, f"{backends}/cpu-whisper/run.sh")
    assert row["Metadata"] == {"meta_backend_for": "cpu-whisper", "name": "whisper"}


def test_available_entries_are_localais_gallery_backends(api: Any, gallery: Gallery) -> None:
    install(entry_row(gallery, "piper", 0, tags=["tts"], license="MIT", alias="tts"))
    entry_row(gallery, "cuda12-whisper", 1)  # an NVIDIA build: not for this machine
    entry_row(gallery, "whisper", 2, capabilities={"default": "cpu-whisper"})

    body = api.get("/backends/available").json()

    assert [entry["name"] for entry in body] == ["piper", "whisper"]
    assert body[0] == {
        "name": "piper",
        "license": "MIT",
        "tags": ["tts"],
        "gallery": {"url": "https://galleries.invalid/main/index.yaml", "name": "main"},
        "installed": True,
        "alias": "tts",
        "uri": "quay.io/example/backends:piper",
        "version": "1.0",
    }
    assert list(body[0]) == ["name", "license", "tags", "gallery", "installed", "alias", "uri", "version"]
    assert "installed" not in body[1] and body[1]["capabilities"] == {"default": "cpu-whisper"}


def test_galleries_are_listed_as_localais_gallery_configs(api: Any, gallery: Gallery) -> None:
    Gallery.objects.create(name="off", url="https://off.example/i.yaml", enabled=False)

    assert api.get("/backends/galleries").json() == [
        {"url": "github:mudler/LocalAI/backend/index.yaml@master", "name": "localai"},
        {"url": "https://galleries.invalid/main/index.yaml", "name": "main"},
    ]


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        ('{"id": "ghost"}', 404, "no backend named 'ghost'"),
        ("{}", 400, "id: This field is required."),
        ('{"id": "piper", "force": "yes"}', 400, "force: Must be a boolean."),
        ("{invalid", 400, "JSON parse error"),
        ('{"id": "piper", "gallery": "x"}', 400, "gallery: Unknown field"),
    ],
)
def test_apply_refuses_what_it_cannot_install_in_localais_envelope(
    api: Any, gallery: Gallery, body: str, code: int, fragment: str
) -> None:
    make_backend(gallery, "piper")

    response = api.generic("POST", "/backends/apply", body, content_type="application/json")

    assert response.status_code == code
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (code, "") and fragment in error["message"]
    assert not UpgradeJob.objects.exists()


def test_apply_of_a_backend_not_installed_queues_its_install(api: Any, gallery: Gallery) -> None:
    make_backend(gallery, "piper")

    body = api.post("/backends/apply", {"id": "main@piper"}, format="json").json()

    job = UpgradeJob.objects.get()
    assert body == {"id": str(job.uuid), "status_url": f"http://testserver/backends/jobs/{job.uuid}"}
    assert (job.kind, job.status) == (JobKind.INSTALL, JobStatus.QUEUED)


def test_rest_delete_queues_an_uninstall(api: Any, gallery: Gallery) -> None:
    install(make_backend(gallery, "piper"))

    body = api.post("/backends/delete/piper").json()

    assert UpgradeJob.objects.get(uuid=body["id"]).kind == JobKind.UNINSTALL


def test_an_installed_alias_names_its_backend(api: Any, gallery: Gallery) -> None:
    backend = make_backend(gallery, "cpu-piper")
    install(backend).__class__.objects.filter(name="cpu-piper").update(alias="piper")

    body = api.post("/backends/upgrade/piper").json()

    assert UpgradeJob.objects.get(uuid=body["id"]).backend == backend


@pytest.mark.registry
def test_a_check_asked_by_hand_flags_upgrades_but_upgrades_nothing(api: Any, published: Any) -> None:
    """LocalAI's manual check also auto-upgrades (core/application/upgrade_checker.go); the portal's
    automatic upgrades follow the schedule and its maintenance window only."""
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    published.push("v2")
    settings_row = PortalSettings.load()
    settings_row.auto_upgrade_backends = True
    settings_row.save()

    api.post("/api/backends/upgrades/check")
    check = UpgradeJob.objects.get(kind=JobKind.CHECK)
    assert jobs.run(check.pk).status == JobStatus.SUCCEEDED  # as the worker runs it

    assert set(api.get("/backends/upgrades").json()) == {"cpu-demo"}
    assert not UpgradeJob.objects.filter(kind=JobKind.UPGRADE).exists()


# --- cross-cutting: JSON, slashes, sign-in, CSRF ----------------------------------------------------------

READS = [
    "/backends",
    "/backends/available",
    "/backends/known",
    "/backends/galleries",
    "/backends/upgrades",
    "/api/backends",
    "/api/backends/upgrades",
    "/api/backends/job/x",
    "/api/operations",
    "/api/operations/history",
]


@pytest.mark.parametrize("path", READS)
def test_every_read_answers_json_with_or_without_a_trailing_slash(api: Any, path: str) -> None:
    plain = api.get(path, HTTP_ACCEPT="text/html")
    slashed = api.get(path + "/")

    assert plain.status_code == slashed.status_code == 200
    assert plain["Content-Type"] == slashed["Content-Type"] == "application/json"
    assert plain.json() == slashed.json()


@pytest.mark.parametrize("path", ["/backends/upgrades", "/api/operations"])
def test_without_credentials_localai_routes_ask_for_a_bearer_key(path: str) -> None:
    response = APIClient().get(path)

    assert response.status_code == 401 and response["WWW-Authenticate"] == "Bearer"
    assert response.json() == {
        "error": {
            "code": 401,
            "message": "An authentication key is required",
            "type": "invalid_request_error",
        }
    }


@pytest.mark.parametrize("path", ["/backends/upgrade/piper", "/api/backends/upgrade/piper"])
def test_a_session_post_without_the_csrf_token_is_a_403_in_localais_envelope(
    gallery: Gallery, path: str
) -> None:
    install(make_backend(gallery, "piper"))
    browser = APIClient(enforce_csrf_checks=True)
    browser.force_login(make_user("browser", perms=(OPERATE,)))

    reading = browser.get("/api/backends/upgrades")
    refused = browser.post(path, {}, format="json")

    assert reading.status_code == 200
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == (403, "authorization_error") and "CSRF" in error["message"]
    assert not UpgradeJob.objects.exists()
    browser.get("/")  # a page sets the csrftoken cookie
    allowed = browser.post(path, {}, format="json", HTTP_X_CSRFTOKEN=browser.cookies["csrftoken"].value)
    assert allowed.status_code == 200


def test_a_reader_is_refused_a_write_in_localais_envelope_naming_the_permission(gallery: Gallery) -> None:
    install(make_backend(gallery, "piper"))
    reader = client_for(make_user("reader"), keyword="Bearer")

    response = reader.post("/api/backends/install/piper")

    assert response.status_code == 403
    assert response.json()["error"]["type"] == "authorization_error"
    assert "backends_app.operate_backend" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path"), [("delete", "/api/backends"), ("get", "/api/backends/install/x")]
)
def test_a_wrong_method_on_a_ui_route_is_a_405_in_localais_envelope(api: Any, method: str, path: str) -> None:
    response = getattr(api, method)(path)

    assert response.status_code == 405
    assert response.json()["error"]["code"] == 405


def test_backend_usecases_are_localais_table(api: Any) -> None:
    """Ported from LocalAI's TestBackendUsecasesReportsTTSForLlamaCpp (ui_api_internal_test.go): the
    TTS filter survives the projection for llama-cpp, which serves Qwen3-TTS."""
    response = api.get("/api/backends/usecases")

    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    table = response.json()
    assert list(table) == sorted(table) and len(table) >= 50
    assert {"tts", "chat"} <= set(table["llama-cpp"])
    assert table["llama-cpp"] == sorted(table["llama-cpp"])
    # Only the gallery's filter keys: llama-cpp's completion, edit, tokenize and score are not filters.
    assert not {"completion", "edit", "tokenize", "score"} & set(table["llama-cpp"])
    assert table["whisper"] == ["transcript", "vad"]
    assert table["depth-anything"] is None  # no filter key at all: Go's nil slice
    assert client_for(None).get("/api/backends/usecases").status_code == 401
