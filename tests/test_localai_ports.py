"""LocalAI's own tests of its backend routes, ported one for one (LocalAI 82c191a).

Each test is named after the Go spec it ports and cites it. Where LocalAI drives an in-process Echo
server, these drive the portal with Django's test client; where LocalAI plants an operation in its
in-memory cache, these make the job row that stands for it (the portal's operations are its jobs).
Where the portal deliberately behaves otherwise (docs/api.md, "Where the portal deliberately
differs"), the test says so and asserts the portal's behaviour.

Not ported: the model-staging specs of ui_api_operations_test.go (:90-173; the portal installs no
models) and the fine-tune/quantization listings of discovery_cluster_installed_test.go (other
endpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.utils import timezone

from backends_app import jobs, procedure
from backends_app.models import (
    Backend,
    Gallery,
    InstalledVersion,
    JobKind,
    JobPhase,
    JobStatus,
    Node,
    UpgradeJob,
)
from tests.conftest import live_version, run_op
from tests.helpers.api import client_for, make_backend, make_gallery, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> Any:
    """LocalAI's specs run without auth (a no-op admin middleware): here, a superuser's Bearer key."""
    return client_for(make_user("admin", superuser=True), keyword="Bearer")


def sync_gallery(name: str, path: Path, entries: list[dict[str, Any]]) -> Gallery:
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    gallery, _ = Gallery.objects.update_or_create(name=name, defaults={"url": path.as_uri()})
    result = gallery.sync(force=True)
    assert result.ok, result.error
    return gallery


def worker_node(name: str, capability: str = "default", *, online: bool = True) -> Node:
    return Node.objects.create(
        name=name,
        queue=name,
        capability=capability,
        backends_path=f"/nodes/{name}/backends",
        last_heartbeat_at=timezone.now() if online else None,
    )


def job_on(backend: Backend, kind: str = JobKind.INSTALL, **fields: Any) -> UpgradeJob:
    fields.setdefault("node", Node.local())
    return UpgradeJob.objects.create(kind=kind, backend=backend, **fields)


def operations(api: Any) -> list[dict[str, Any]]:
    response = api.get("/api/operations")
    assert response.status_code == 200
    return list(response.json()["operations"])


def operation_of(api: Any, job: UpgradeJob) -> dict[str, Any]:
    found = [op for op in operations(api) if op["jobID"] == str(job.uuid)]
    assert len(found) == 1, operations(api)
    return found[0]


# --- core/http/routes/ui_api_backends_test.go ("Backend API Routes") ---------------------------------


def test_install_external_should_return_error_when_uri_is_missing(api: Any) -> None:
    """ui_api_backends_test.go:87-106, POST /api/backends/install-external > should return error when
    URI is missing."""
    response = api.post("/api/backends/install-external", {"name": "test-backend"}, format="json")

    assert response.status_code == 400
    assert response.json()["error"] == "uri is required"
    assert not UpgradeJob.objects.exists()


def test_install_external_should_accept_valid_request_and_return_job_id(api: Any) -> None:
    """ui_api_backends_test.go:108-130, > should accept valid request and return job ID."""
    body = {"uri": "oci://quay.io/example/backend:latest", "name": "test-backend", "alias": "test-alias"}

    response = api.post("/api/backends/install-external", body, format="json")

    assert response.status_code == 200
    assert response.json()["jobID"]
    assert response.json()["message"] == "External backend installation started"
    job = UpgradeJob.objects.get(uuid=response.json()["jobID"])
    assert (job.kind, job.backend.name, job.backend.uri, job.backend.alias) == (
        JobKind.INSTALL,
        "test-backend",
        "oci://quay.io/example/backend:latest",
        "test-alias",
    )


def test_install_external_should_accept_request_with_only_uri(api: Any) -> None:
    """ui_api_backends_test.go:132-151, > should accept request with only URI (a directory: its name
    is the directory's)."""
    response = api.post("/api/backends/install-external", {"uri": "/path/to/local/backend"}, format="json")

    assert response.status_code == 200
    assert response.json()["jobID"]
    job = UpgradeJob.objects.get(uuid=response.json()["jobID"])
    assert (job.backend.name, job.backend.uri) == ("backend", "/path/to/local/backend")


def test_install_external_should_return_error_for_invalid_json_body(api: Any) -> None:
    """ui_api_backends_test.go:153-161, > should return error for invalid JSON body."""
    response = api.generic(
        "POST", "/api/backends/install-external", "invalid json", content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid request body")


def test_job_should_return_queued_status_for_unknown_job(api: Any) -> None:
    """ui_api_backends_test.go:165-178, GET /api/backends/job/:uid > should return queued status for
    unknown job."""
    response = api.get("/api/backends/job/unknown-job-id")

    assert response.status_code == 200
    assert response.json()["queued"] is True
    assert response.json()["processed"] is False


@pytest.fixture
def upgrade_world(settings: Any) -> dict[str, Any]:
    """ui_api_backends_test.go:188-247: a v1 backend on disk with metadata.json at 1.0.0, a v2 source
    directory, and a gallery (inside the backends directory, as LocalAI's trusted-root rule wants it)
    offering 2.0.0 from that directory."""
    backends = Path(settings.PORTAL_BACKENDS_PATH)
    installed = backends / "test-upgrade-backend"
    installed.mkdir(parents=True)
    (installed / "run.sh").write_text("#!/bin/sh\necho v1")
    (installed / "run.sh").chmod(0o755)
    metadata = {"installed_at": "2024-01-01T00:00:00Z", "name": "test-upgrade-backend", "version": "1.0.0"}
    (installed / "metadata.json").write_text(json.dumps(metadata, indent=2))
    source = backends / "v2-backend-src"
    source.mkdir()
    (source / "run.sh").write_text("#!/bin/sh\necho v2")
    (source / "run.sh").chmod(0o755)
    sync_gallery(
        "test",
        backends / "test-gallery.yaml",
        [{"name": "test-upgrade-backend", "uri": str(source), "version": "2.0.0"}],
    )
    procedure.record_disk_state(Node.local())  # what the worker's scan does at start
    return {"backends": backends, "installed": installed}


def test_upgrades_should_return_available_upgrades(api: Any, upgrade_world: dict[str, Any]) -> None:
    """ui_api_backends_test.go:250-263, GET /api/backends/upgrades > should return available upgrades."""
    response = api.get("/api/backends/upgrades")

    assert response.status_code == 200
    assert isinstance(response.json(), dict)


def test_upgrade_should_accept_upgrade_request_and_return_job_id(
    api: Any, upgrade_world: dict[str, Any]
) -> None:
    """ui_api_backends_test.go:267-281, POST /api/backends/upgrade/:name > should accept upgrade request
    and return job ID."""
    response = api.post("/api/backends/upgrade/test-upgrade-backend", content_type="application/json")

    assert response.status_code == 200
    assert response.json()["uuid"]
    assert response.json()["statusUrl"]


def test_upgrade_should_upgrade_the_backend_and_update_metadata(
    api: Any, upgrade_world: dict[str, Any]
) -> None:
    """ui_api_backends_test.go:283-320, > should upgrade the backend and update metadata."""
    response = api.post("/api/backends/upgrade/test-upgrade-backend", content_type="application/json")
    assert response.status_code == 200
    job_id = response.json()["uuid"]

    jobs.run(UpgradeJob.objects.get(uuid=job_id).pk)  # what a worker does with the queued job
    status = api.get(f"/api/backends/job/{job_id}").json()

    assert status["processed"] is True
    assert "v2" in (upgrade_world["installed"] / "run.sh").read_text()
    assert '"version": "2.0.0"' in (upgrade_world["installed"] / "metadata.json").read_text()


def test_upgrades_check_should_trigger_an_upgrade_check_and_return_200(
    api: Any, upgrade_world: dict[str, Any]
) -> None:
    """ui_api_backends_test.go:324-332, POST /api/backends/upgrades/check > should trigger an upgrade
    check and return 200."""
    response = api.post("/api/backends/upgrades/check", content_type="application/json")

    assert response.status_code == 200
    assert UpgradeJob.objects.filter(kind=JobKind.CHECK, status=JobStatus.QUEUED).count() == 1


# --- core/http/routes/ui_api_operations_test.go ("/api/operations with node-scoped backend ops") -----


@pytest.fixture
def gallery() -> Gallery:
    return make_gallery("main")


def test_emits_node_id_and_the_unprefixed_backend_name_for_keys_built_by_node_scoped_key(
    api: Any, gallery: Gallery
) -> None:
    """ui_api_operations_test.go:210-244: an operation on one named node carries `nodeID`, and `name`
    is the backend's bare name."""
    job = job_on(make_backend(gallery, "llama-cpp"), node=worker_node("worker-7"))

    op = operation_of(api, job)

    assert op["nodeID"] == "worker-7"
    assert op["name"] == "llama-cpp"
    assert op["isBackend"] is True


def test_surfaces_per_node_op_status_entries_on_api_operations(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_test.go:246-301: a fan-out across nodes lists each node's progress, sorted by
    node name."""
    backend = make_backend(gallery, "vllm")
    parent = UpgradeJob.objects.create(kind=JobKind.INSTALL, backend=backend, status=JobStatus.RUNNING)
    job_on(
        backend,
        node=worker_node("worker-b"),
        parent=parent,
        status=JobStatus.RUNNING,
        phase=JobPhase.HEALTH_CHECK,
    )
    job_on(
        backend,
        node=worker_node("worker-a"),
        parent=parent,
        status=JobStatus.RUNNING,
        phase=JobPhase.DOWNLOADING,
        percent=30,
        source="vllm.tar",
    )

    op = operation_of(api, parent)

    assert len(operations(api)) == 1  # the fan-out once, not once per node
    nodes = op["nodes"]
    assert [n["node_name"] for n in nodes] == ["worker-a", "worker-b"]
    assert all(list(node) == sorted(node) for node in nodes)  # Go maps in LocalAI's list
    assert nodes[0]["status"] == "downloading" and nodes[0]["file_name"] == "vllm.tar"
    assert nodes[0]["percentage"] == 30.0
    assert nodes[1]["status"] == "running_on_worker"


def test_does_not_emit_node_id_for_non_node_scoped_backend_ops(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_test.go:303-335."""
    job = job_on(make_backend(gallery, "llama-cpp"))

    op = operation_of(api, job)

    assert "nodeID" not in op
    assert op["name"] == "llama-cpp"


def test_reports_an_admitted_operation_the_worker_has_not_started_as_queued(
    api: Any, gallery: Gallery
) -> None:
    """ui_api_operations_test.go:337-381: a queued operation (another one holds the worker)."""
    job_on(make_backend(gallery, "busy"), status=JobStatus.RUNNING, phase=JobPhase.DOWNLOADING)
    waiting = job_on(make_backend(gallery, "qwen3-4b"))

    op = operation_of(api, waiting)

    assert op["isQueued"] is True
    assert op["cancellable"] is True


def test_offers_cancel_on_a_queued_removal(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_test.go:383-410."""
    job = job_on(make_backend(gallery, "piper"), JobKind.UNINSTALL)

    op = operation_of(api, job)

    assert (op["isQueued"], op["isDeletion"], op["cancellable"]) == (True, True, True)


def test_does_not_offer_cancel_once_a_removal_is_running(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_test.go:412-444."""
    job = job_on(make_backend(gallery, "piper"), JobKind.UNINSTALL, status=JobStatus.RUNNING)

    op = operation_of(api, job)

    assert (op["isQueued"], op["isDeletion"], op["cancellable"]) == (False, True, False)


def test_does_not_emit_is_cancelled_which_no_live_operation_can_ever_be(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_test.go:446-473."""
    job_on(
        make_backend(gallery, "qwen-asr"), status=JobStatus.RUNNING, phase=JobPhase.DOWNLOADING, percent=10
    )

    listed = operations(api)

    assert len(listed) == 1
    assert "isCancelled" not in listed[0]
    assert listed[0]["progress"] == 10 and listed[0]["cancellable"] is True


def test_pauses_through_the_resume_safe_operation_callback(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_test.go:475-500. The portal keeps no partial download to resume, so a pause
    is a cancel (docs/api.md): the operation ends cancelled and leaves the list."""
    job = job_on(make_backend(gallery, "gemma"))

    response = api.post(f"/api/operations/{job.uuid}/pause")

    assert response.status_code == 200 and response.json()["success"] is True
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert operations(api) == []


def test_reports_a_running_removal_as_a_deletion(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_test.go:502-531."""
    job = job_on(
        make_backend(gallery, "piper"),
        JobKind.UNINSTALL,
        status=JobStatus.RUNNING,
        phase=JobPhase.SWAPPING,
        message="removing piper",
    )

    op = operation_of(api, job)

    assert (op["isQueued"], op["isDeletion"], op["taskType"]) == (False, True, "deletion")
    assert op["message"] == "removing piper"


def test_still_reports_a_failed_removal_as_a_deletion(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_test.go:533-563. A failed operation leaves the live list in the portal (its
    job page and the history keep it, docs/api.md); the history reports it as a failed deletion."""
    job = job_on(
        make_backend(gallery, "piper"),
        JobKind.UNINSTALL,
        status=JobStatus.FAILED,
        error="permission denied",
        finished_at=timezone.now(),
    )

    records = api.get("/api/operations/history").json()["operations"]

    assert operations(api) == []
    assert [(r["jobID"], r["taskType"], r["outcome"], r["error"]) for r in records] == [
        (str(job.uuid), "deletion", "failed", "permission denied")
    ]


def test_surfaces_managed_model_artifact_phase_and_byte_counters(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_test.go:565-600, for a backend's image pull."""
    job = job_on(
        make_backend(gallery, "kokoro"),
        status=JobStatus.RUNNING,
        phase=JobPhase.DOWNLOADING,
        bytes_done=1024,
        bytes_total=4096,
        percent=22.5,
    )

    op = operation_of(api, job)

    assert (op["phase"], op["currentBytes"], op["totalBytes"], op["progress"]) == (
        "downloading",
        1024,
        4096,
        22,
    )


# --- core/http/routes/ui_api_operations_history_test.go ----------------------------------------------


def finish(backend: Backend, minutes_ago: int) -> UpgradeJob:
    """ui_api_operations_history_test.go:53-57: an operation that ran and completed."""
    when = timezone.now() - timezone.timedelta(minutes=minutes_ago)
    return job_on(backend, status=JobStatus.SUCCEEDED, percent=100, started_at=when, finished_at=when)


def test_history_returns_an_empty_list_before_anything_has_run(api: Any) -> None:
    """ui_api_operations_history_test.go:66-75."""
    response = api.get("/api/operations/history")

    assert response.status_code == 200
    assert response.json() == {"operations": []}


def test_history_returns_finished_operations_newest_first(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_history_test.go:77-91."""
    finish(make_backend(gallery, "model-one"), minutes_ago=2)
    finish(make_backend(gallery, "model-two"), minutes_ago=1)

    records = api.get("/api/operations/history").json()["operations"]

    assert len(records) == 2
    assert records[0]["name"] == "model-two"
    assert records[0]["outcome"] == "completed"


def test_history_empties_the_record_on_delete(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_history_test.go:93-102. Deliberately refused in the portal: every finished
    job is its record of what changed where (docs/api.md). The refusal says so and the record stays."""
    finish(make_backend(gallery, "model-one"), minutes_ago=1)

    response = api.delete("/api/operations/history")

    assert response.status_code == 409
    assert "audit trail" in response.json()["error"]
    assert len(api.get("/api/operations/history").json()["operations"]) == 1


def test_history_reports_a_failed_clear_as_a_500_rather_than_claiming_success(api: Any) -> None:
    """ui_api_operations_history_test.go:107-126: a clear that did not happen never claims success."""
    response = api.delete("/api/operations/history")

    assert response.status_code >= 400
    assert "error" in response.json()
    assert "success" not in response.json()


def test_history_leaves_the_live_operations_payload_unchanged(api: Any, gallery: Gallery) -> None:
    """ui_api_operations_history_test.go:128-140."""
    job_on(make_backend(gallery, "live"), status=JobStatus.RUNNING, percent=42)

    body = api.get("/api/operations").json()

    assert list(body) == ["operations"]
    assert body["operations"][0]["progress"] == 42


# --- core/http/routes/ui_api_operations_backend_classification_test.go --------------------------------


def test_classifies_a_gpu_only_backend_op_as_a_backend_on_a_gpu_less_host(api: Any, tmp_path: Path) -> None:
    """ui_api_operations_backend_classification_test.go:30-86."""
    gallery = sync_gallery(
        "test",
        tmp_path / "gallery.yaml",
        [
            {
                "name": "longcat-video",
                "capabilities": {
                    "nvidia": "longcat-video-nvidia",
                    "nvidia-cuda-13": "longcat-video-cuda-13",
                    "nvidia-l4t-cuda-13": "longcat-video-l4t-cuda-13",
                },
            }
        ],
    )
    assert Node.local().capability == "default"
    job = job_on(Backend.objects.get(gallery=gallery, name="longcat-video"))

    assert operation_of(api, job)["isBackend"] is True


# --- core/http/endpoints/localai/backend_test.go ("Backend Endpoints", GET /backends/known) -----------


def known(api: Any) -> dict[str, dict[str, Any]]:
    response = api.get("/backends/known")
    assert response.status_code == 200
    return {entry["name"]: entry for entry in response.json()}


def test_known_returns_200_with_a_known_backend_payload(api: Any) -> None:
    """backend_test.go:64-75."""
    response = api.get("/backends/known")

    assert response.status_code == 200
    assert isinstance(response.json(), list) and response.json()


def test_known_is_a_superset_of_the_importer_registry(api: Any) -> None:
    """backend_test.go:77-105."""
    entries = known(api)

    assert {"llama-cpp", "mlx", "vllm", "transformers", "diffusers", "privacy-filter"} <= set(entries)
    assert entries["privacy-filter"]["auto_detect"] is True
    assert entries["privacy-filter"]["modality"] == "text"


def test_known_includes_drop_in_llama_cpp_replacements_with_auto_detect_false(api: Any) -> None:
    """backend_test.go:107-129."""
    entries = known(api)

    for name in ("ik-llama-cpp", "turboquant"):
        assert entries[name]["auto_detect"] is False
        assert entries[name]["modality"] == "text"


def test_known_includes_curated_pref_only_backends_with_auto_detect_false(api: Any) -> None:
    """backend_test.go:131-165."""
    expected = {
        "sglang": "text",
        "tinygrad": "text",
        "trl": "text",
        "mlx-vlm": "text",
        "mlx-audio": "tts",
        "whisperx": "asr",
        "crispasr": "asr",
        "kokoros": "tts",
        "qwen-tts": "tts",
        "qwen3-tts-cpp": "tts",
        "magpie-tts-cpp": "tts",
        "faster-qwen3-tts": "tts",
        "supertonic": "tts",
        "sam3-cpp": "detection",
    }
    entries = known(api)

    for name, modality in expected.items():
        assert entries[name]["auto_detect"] is False, name
        assert entries[name]["modality"] == modality, name


def test_known_marks_importer_owned_entries_with_auto_detect_true(api: Any) -> None:
    """backend_test.go:167-186."""
    entries = known(api)

    for name in ("llama-cpp", "mlx", "vllm", "transformers", "diffusers"):
        assert entries[name]["auto_detect"] is True, name


def test_known_returns_no_duplicates(api: Any) -> None:
    """backend_test.go:188-203."""
    names = [entry["name"] for entry in api.get("/backends/known").json()]

    assert len(names) == len(set(names))


def test_known_exposes_an_installed_field_on_every_entry_via_the_json_payload(api: Any) -> None:
    """backend_test.go:205-220."""
    payload = api.get("/backends/known").json()

    assert payload and all("installed" in entry for entry in payload)


def write_fake_backend(settings: Any, name: str) -> None:
    """A backend directory with a run.sh, recorded the way the worker's scan records it."""
    directory = Path(settings.PORTAL_BACKENDS_PATH) / name
    directory.mkdir(parents=True)
    (directory / "run.sh").write_text("#!/bin/sh\n")
    (directory / "run.sh").chmod(0o755)
    procedure.record_disk_state(Node.local())


def test_known_marks_backends_present_on_disk_as_installed_true_and_others_false(
    api: Any, settings: Any
) -> None:
    """backend_test.go:222-248."""
    write_fake_backend(settings, "llama-cpp")

    entries = known(api)

    assert entries["llama-cpp"]["installed"] is True
    assert entries["llama-cpp"]["auto_detect"] is True
    assert entries["sglang"]["installed"] is False


def test_known_adds_system_only_backends_with_installed_true_and_empty_modality(
    api: Any, settings: Any
) -> None:
    """backend_test.go:250-270."""
    write_fake_backend(settings, "custom-local-backend")

    entry = known(api)["custom-local-backend"]

    assert (entry["installed"], entry["modality"], entry["auto_detect"]) == (True, "", False)


def test_known_advertises_audio_cpp_as_a_preference_only_backend_naming_its_other_modalities(
    api: Any,
) -> None:
    """backend_test.go:272-298."""
    entry = known(api)["audio-cpp"]

    assert entry["auto_detect"] is False
    assert entry["modality"] == "tts"
    assert "ASR" in entry["description"]


def test_known_advertises_nemo_speech_cpp_as_a_preference_only_backend_naming_its_other_families(
    api: Any,
) -> None:
    """backend_test.go:300-328."""
    entry = known(api)["nemo-speech-cpp"]

    assert entry["auto_detect"] is False
    assert entry["modality"] == "asr"
    for word in ("diarization", "synthesis", "translation"):
        assert word in entry["description"]


def test_known_is_sorted_by_modality_then_name(api: Any, settings: Any) -> None:
    """backend_test.go:330-347."""
    write_fake_backend(settings, "aaa-local")
    payload = api.get("/backends/known").json()

    keys = [(entry["modality"], entry["name"]) for entry in payload]

    assert keys == sorted(keys)
    assert keys[0] == ("", "aaa-local")  # an unclassified name sorts first


# --- core/http/endpoints/localai/backend_apply_test.go ("POST /backends/apply force plumbing") --------


@pytest.mark.registry
def test_apply_enqueues_a_non_forced_op_by_default(api: Any, published: Any, settings: Any) -> None:
    """backend_apply_test.go:68-76. LocalAI's apply without `force` leaves an installed backend alone
    (core/services/galleryop/backend_force_test.go): the job ends at once and nothing is downloaded,
    even though the tag now holds a newer build."""
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    published.push("v2")

    response = api.post("/backends/apply", {"id": "cpu-demo"}, format="json")

    assert response.status_code == 200
    job = UpgradeJob.objects.get(uuid=response.json()["id"])
    assert (job.kind, job.status, job.force) == (JobKind.INSTALL, JobStatus.SUCCEEDED, False)
    assert "already installed" in job.message
    assert live_version(settings, "cpu-demo") == "v1"


@pytest.mark.registry
def test_apply_enqueues_a_forced_op_when_the_request_sets_force(
    api: Any, published: Any, settings: Any
) -> None:
    """backend_apply_test.go:78-86: with `force` the backend is installed again, from what the tag
    holds now."""
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    published.push("v2")

    response = api.post("/backends/apply", {"id": "cpu-demo", "force": True}, format="json")

    assert response.status_code == 200
    job = UpgradeJob.objects.get(uuid=response.json()["id"])
    assert (job.status, job.force) == (JobStatus.QUEUED, True)
    assert jobs.run(job.pk).status == JobStatus.SUCCEEDED  # as the worker runs it
    assert live_version(settings, "cpu-demo") == "v2"


# --- core/http/endpoints/localai/backend_available_cluster_test.go -----------------------------------


@pytest.fixture
def cluster_gallery(tmp_path: Path) -> Gallery:
    """backend_available_cluster_test.go:32-65: a GPU-only meta and one that runs anywhere."""
    return sync_gallery(
        "test-gallery",
        tmp_path / "gallery.yaml",
        [
            {
                "name": "longcat-video",
                "capabilities": {
                    "nvidia": "longcat-video-nvidia",
                    "nvidia-cuda-13": "longcat-video-cuda-13",
                    "nvidia-l4t-cuda-13": "longcat-video-l4t-cuda-13",
                },
            },
            {"name": "whisper", "capabilities": {"default": "whisper-cpu"}},
        ],
    )


def available_names(api: Any) -> list[str]:
    response = api.get("/backends/available")
    assert response.status_code == 200
    return [entry["name"] for entry in response.json()]


def test_available_hides_gpu_only_backends_with_no_provider_single_node(
    api: Any, cluster_gallery: Gallery
) -> None:
    """backend_available_cluster_test.go:86-90."""
    names = available_names(api)

    assert "whisper" in names
    assert "longcat-video" not in names


def test_available_lists_gpu_only_backends_a_worker_node_can_run(api: Any, cluster_gallery: Gallery) -> None:
    """backend_available_cluster_test.go:92-97: a worker node reporting nvidia-l4t-cuda-13."""
    worker_node("jetson", "nvidia-l4t-cuda-13")

    assert {"whisper", "longcat-video"} <= set(available_names(api))


def test_available_falls_back_to_the_local_listing_when_the_registry_errors(
    api: Any, cluster_gallery: Gallery
) -> None:
    """backend_available_cluster_test.go:99-108. The portal's node registry is its database; a node
    that stopped reporting (no heartbeat) is what it cannot vouch for: its capability does not count."""
    worker_node("jetson", "nvidia-l4t-cuda-13", online=False)

    names = available_names(api)

    assert "whisper" in names
    assert "longcat-video" not in names


# --- core/http/endpoints/localai/discovery_cluster_installed_test.go (GET /backends/available) --------


@pytest.fixture
def trainers(tmp_path: Path, settings: Any) -> Gallery:
    """discovery_cluster_installed_test.go:35-73: cpu-trainer on this machine's disk; gpu-trainer (an
    NVIDIA-only meta) a gallery entry."""
    write_fake_backend(settings, "cpu-trainer")
    tags = ["fine-tuning", "quantization"]
    return sync_gallery(
        "test-gallery",
        tmp_path / "gallery.yaml",
        [
            {"name": "gpu-trainer", "tags": tags, "capabilities": {"nvidia-cuda-13": "gpu-trainer-cuda-13"}},
            {"name": "cpu-trainer", "tags": tags, "capabilities": {"default": "cpu-trainer-cpu"}},
        ],
    )


def installed_flags(api: Any) -> dict[str, bool]:
    return {entry["name"]: entry.get("installed", False) for entry in api.get("/backends/available").json()}


def test_available_reports_a_worker_installed_backend_as_installed(api: Any, trainers: Gallery) -> None:
    """discovery_cluster_installed_test.go:162-166."""
    worker = worker_node("gpu-1", "nvidia-cuda-13")
    InstalledVersion.objects.create(
        node=worker,
        backend=Backend.objects.get(gallery=trainers, name="gpu-trainer"),
        name="gpu-trainer",
        path=f"{worker.backends_path}/gpu-trainer",
    )

    flags = installed_flags(api)

    assert flags["gpu-trainer"] is True
    assert flags["cpu-trainer"] is True


def test_available_keeps_single_node_install_state_unchanged_with_no_provider(
    api: Any, trainers: Gallery
) -> None:
    """discovery_cluster_installed_test.go:168-172: the GPU node runs nothing of it yet."""
    worker_node("gpu-1", "nvidia-cuda-13")

    flags = installed_flags(api)

    assert flags["gpu-trainer"] is False
    assert flags["cpu-trainer"] is True
