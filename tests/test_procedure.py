"""Install, upgrade, rollback, uninstall against a real registry: LocalAI's layout, nothing ever lost."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from backends_app import jobs, procedure
from backends_app.disk import layout
from backends_app.models import (
    Backend,
    Gallery,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    OperationRefused,
    PortalSettings,
    UpgradeJob,
)
from tests.conftest import image, live_version, run_op

pytestmark = pytest.mark.django_db


def test_install_writes_localais_layout_with_the_pulled_digest(published: Any, settings: Any) -> None:
    job = run_op(published.backend, JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    live = Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo"
    assert (live / "run.sh").read_text() == "#!/bin/sh\necho v1\n"
    assert (live / "run.sh").stat().st_mode & 0o111
    metadata = json.loads((live / "metadata.json").read_text())
    assert set(metadata) == {"alias", "name", "gallery_url", "installed_at", "uri", "digest"}
    assert metadata["name"] == "cpu-demo" and metadata["alias"] == "demo"
    assert metadata["digest"] == published.first_digest
    assert metadata["uri"] == published.ref
    assert layout.parse_rfc3339(metadata["installed_at"]) is not None
    row = InstalledVersion.objects.get(name="cpu-demo", state=InstalledVersion.State.CURRENT)
    assert row.digest == published.first_digest and row.backend == published.backend
    assert job.to_digest == published.first_digest and job.source == published.ref
    assert job.bytes_total > 0 and job.bytes_done == job.bytes_total
    # Nothing of ours inside the backends directory: LocalAI lists every directory there.
    assert sorted(p.name for p in Path(settings.PORTAL_BACKENDS_PATH).iterdir()) == ["cpu-demo"]


def test_upgrade_keeps_the_previous_version_and_rollback_brings_it_back(
    published: Any, settings: Any
) -> None:
    run_op(published.backend, JobKind.INSTALL)
    second = published.push("v2")

    upgrade = run_op(published.backend, JobKind.UPGRADE)

    assert upgrade.status == JobStatus.SUCCEEDED, upgrade.error
    assert live_version(settings, "cpu-demo") == "v2"
    assert upgrade.from_digest == published.first_digest and upgrade.to_digest == second
    rows = InstalledVersion.objects.filter(name="cpu-demo")
    assert rows.get(state="current").digest == second
    kept = rows.get(state="kept")
    assert kept.digest == published.first_digest
    assert (Path(kept.path) / "lib/version.txt").read_text() == "v1"
    assert not Path(kept.path).is_relative_to(settings.PORTAL_BACKENDS_PATH)

    rollback = run_op(published.backend, JobKind.ROLLBACK)

    assert rollback.status == JobStatus.SUCCEEDED, rollback.error
    assert live_version(settings, "cpu-demo") == "v1"
    assert json.loads((Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo/metadata.json").read_text())[
        "digest"
    ] == (published.first_digest)
    assert InstalledVersion.objects.get(name="cpu-demo", state="current").digest == published.first_digest
    published.backend.refresh_from_db()
    assert published.backend.held_digest == second  # the version rolled back from is held


def test_a_gallery_set_through_the_web_cannot_make_the_workers_run_its_health_command(
    published: Any, settings: Any, gallery_factory: Any, tmp_path: Path
) -> None:
    """Whoever may add a gallery in the admin or the API must not run code on every node: the
    health-check command of such a gallery's entries is ignored (the settings' command still runs)."""
    proof = tmp_path / "ran"
    gallery = gallery_factory(
        [{"name": "cpu-demo", "uri": published.ref, "healthcheck": {"command": f"touch {proof}"}}]
    )
    Gallery.objects.filter(pk=gallery.pk).update(set_through_web=True)
    backend = Backend.objects.lookup("cpu-demo")

    job = run_op(backend, JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert not proof.exists()
    Gallery.objects.filter(pk=gallery.pk).update(set_through_web=False)  # configured by the operator
    assert run_op(backend, JobKind.UPGRADE, force=True).status == JobStatus.SUCCEEDED
    assert proof.exists()


def test_a_health_failing_upgrade_is_rolled_back_automatically_and_held(
    published: Any, settings: Any, gallery_factory: Any
) -> None:
    gallery_factory(
        [
            {
                "name": "cpu-demo",
                "uri": published.ref,
                "healthcheck": {"command": "sh -c 'grep -q good {path}/lib/version.txt'", "timeout": 10},
            }
        ]
    )
    backend = Backend.objects.lookup("cpu-demo")
    published.push("good-1")
    assert run_op(backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    bad = published.push("bad-3")

    job = run_op(backend, JobKind.UPGRADE)

    assert job.status == JobStatus.ROLLED_BACK
    assert "health check failed" in job.error
    assert live_version(settings, "cpu-demo") == "good-1"
    backend.refresh_from_db()
    assert backend.held_digest == bad and "health check failed" in backend.held_reason
    assert InstalledVersion.objects.get(name="cpu-demo", state="current").version == ""
    assert InstalledVersion.objects.get(name="cpu-demo", state="current").digest != bad
    assert list((Path(settings.PORTAL_STATE_PATH) / "journal").glob("*.json")) == []


def test_an_image_without_an_executable_run_sh_is_refused_and_the_old_one_stays(
    published: Any, settings: Any
) -> None:
    run_op(published.backend, JobKind.INSTALL)
    published.push("v2", executable=False)

    job = run_op(published.backend, JobKind.UPGRADE)

    assert job.status == JobStatus.FAILED and "run.sh" in job.error
    assert live_version(settings, "cpu-demo") == "v1"
    assert list((Path(settings.PORTAL_STATE_PATH) / "staging").rglob("run.sh")) == []


def test_a_corrupt_blob_fails_the_upgrade_and_leaves_nothing_behind(
    published: Any, settings: Any, registry: Any
) -> None:
    run_op(published.backend, JobKind.INSTALL)
    published.push("v2-corrupt")
    with registry.client() as client:
        resolved = client.resolve(published.ref)
    blob = registry.blob_path(resolved.layers[0].digest)
    blob.write_bytes(bytes(b ^ 0xFF for b in blob.read_bytes()))  # same size, other bytes

    job = run_op(published.backend, JobKind.UPGRADE)

    assert job.status == JobStatus.FAILED and "hashes to" in job.error
    assert live_version(settings, "cpu-demo") == "v1"
    staging = Path(settings.PORTAL_STATE_PATH) / "staging"
    assert [p for p in staging.rglob("*") if p.is_file()] == []
    assert InstalledVersion.objects.get(name="cpu-demo", state="current").digest == published.first_digest


def test_not_enough_space_is_refused_before_downloading(
    published: Any, settings: Any, monkeypatch: Any
) -> None:
    run_op(published.backend, JobKind.INSTALL)
    published.push("v2")
    monkeypatch.setattr(procedure, "SPACE_MARGIN", 1 << 60)  # more than any disk here

    job = run_op(published.backend, JobKind.UPGRADE)

    assert job.status == JobStatus.FAILED and "MiB free" in job.error
    assert live_version(settings, "cpu-demo") == "v1"
    assert job.bytes_done == 0


def test_pinned_backend_upgrade_asks_for_force(published: Any, settings: Any) -> None:
    run_op(published.backend, JobKind.INSTALL)
    published.backend.pin()
    published.push("v2")

    with pytest.raises(OperationRefused, match="pinned"):
        published.backend.request(JobKind.UPGRADE, queue=False)
    job = run_op(published.backend, JobKind.UPGRADE, force=True)
    assert job.status == JobStatus.SUCCEEDED and live_version(settings, "cpu-demo") == "v2"


def test_versions_kept_setting_prunes_older_kept_versions(published: Any, settings: Any) -> None:
    row = PortalSettings.load()
    row.versions_kept = 2
    row.save()
    run_op(published.backend, JobKind.INSTALL)
    for version in ("v2", "v3", "v4"):
        published.push(version)
        assert run_op(published.backend, JobKind.UPGRADE).status == JobStatus.SUCCEEDED

    kept = InstalledVersion.objects.filter(name="cpu-demo", state="kept")
    assert sorted((Path(r.path) / "lib/version.txt").read_text() for r in kept) == ["v2", "v3"]
    assert len(list((Path(settings.PORTAL_STATE_PATH) / "kept/cpu-demo").iterdir())) == 2


def test_meta_backend_installs_its_concrete_backend_and_points_to_it(
    registry: Any, gallery_factory: Any, settings: Any
) -> None:
    ref = registry.push_image(image("cpu-1"), tag="latest")
    gallery_factory(
        [
            {"name": "demo", "capabilities": {"default": "cpu-demo", "nvidia": "cuda-demo"}},
            {"name": "cpu-demo", "uri": ref},
            {"name": "cuda-demo", "uri": ref.replace(":latest", ":missing")},
        ]
    )

    job = run_op(Backend.objects.lookup("demo"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    root = Path(settings.PORTAL_BACKENDS_PATH)
    assert sorted(p.name for p in (root / "demo").iterdir()) == ["metadata.json"]
    meta = json.loads((root / "demo/metadata.json").read_text())
    assert meta["meta_backend_for"] == "cpu-demo" and meta["name"] == "demo"
    assert (root / "cpu-demo/run.sh").exists()
    assert InstalledVersion.objects.get(name="demo").is_meta


def test_uninstall_removes_the_backend_its_kept_versions_and_rows(published: Any, settings: Any) -> None:
    run_op(published.backend, JobKind.INSTALL)
    published.push("v2")
    run_op(published.backend, JobKind.UPGRADE)

    job = run_op(published.backend, JobKind.UNINSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert not (Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo").exists()
    assert not InstalledVersion.objects.filter(name="cpu-demo").exists()
    assert list((Path(settings.PORTAL_STATE_PATH) / "trash").iterdir()) == []


def test_operations_that_make_no_sense_are_refused_with_a_reason(published: Any) -> None:
    with pytest.raises(OperationRefused, match="not installed"):
        published.backend.request(JobKind.UPGRADE, queue=False)
    run_op(published.backend, JobKind.INSTALL)
    with pytest.raises(OperationRefused, match="no kept version"):
        published.backend.request(JobKind.ROLLBACK, queue=False)


def test_a_second_request_gets_the_active_job_back(published: Any) -> None:
    first, created = published.backend.request(JobKind.INSTALL, queue=False)
    again, created_again = published.backend.request(JobKind.INSTALL, queue=False)
    assert created and not created_again and again.pk == first.pk


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_upgrade_requests_produce_one_download(
    registry: Any, fault_proxy_factory: Any, gallery_factory: Any, monkeypatch: Any, settings: Any
) -> None:
    from django_q.conf import Conf

    proxy = fault_proxy_factory(registry.host)
    repo = registry.unique_repo()
    registry.push_image(image("v1"), repo=repo, tag="latest")
    gallery_factory([{"name": "cpu-demo", "uri": f"{proxy.host}/{repo}:latest"}])
    backend = Backend.objects.lookup("cpu-demo")
    assert run_op(backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    registry.push_image(image("v2"), repo=repo, tag="latest")
    proxy.log.clear()
    monkeypatch.setattr(Conf, "SYNC", True)  # the job runs inside the request that created it
    barrier = threading.Barrier(50)
    answers: list[tuple[int, bool]] = []

    def ask() -> None:
        try:
            barrier.wait(timeout=30)
            job, created = Backend.objects.lookup("cpu-demo").request(JobKind.UPGRADE, requested_by="test")
            answers.append((job.pk, created))
        finally:
            connection.close()

    threads = [threading.Thread(target=ask) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(answers) == 50
    assert sum(created for _, created in answers) == 1
    created_id = next(pk for pk, created in answers if created)
    jobs = UpgradeJob.objects.filter(kind=JobKind.UPGRADE)
    assert list(jobs.values_list("pk", flat=True)) == [created_id]
    assert jobs.get().status == JobStatus.SUCCEEDED
    layer_gets = [path for _, method, path, _ in proxy.log if method == "GET" and "/blobs/" in path]
    resolved_layers = len(registry.client().resolve(f"{registry.host}/{repo}:latest").layers)
    assert len(layer_gets) == resolved_layers  # each layer fetched once: one download
    assert live_version(settings, "cpu-demo") == "v2"


def test_adopting_a_hand_made_localai_directory(settings: Any, gallery_factory: Any, capsys: Any) -> None:
    gallery_factory([{"name": "cpu-whisper", "uri": "quay.io/example/whisper:latest"}])
    root = Path(settings.PORTAL_BACKENDS_PATH)
    (root / "cpu-whisper").mkdir(parents=True)
    (root / "cpu-whisper/run.sh").write_text("#!/bin/sh\n")
    (root / "cpu-whisper/run.sh").chmod(0o755)
    (root / "cpu-whisper/metadata.json").write_text(
        json.dumps({"name": "cpu-whisper", "version": "1.4.0", "digest": "sha256:" + "a" * 64})
    )
    (root / "whisper").mkdir()
    (root / "whisper/metadata.json").write_text(
        json.dumps({"name": "whisper", "meta_backend_for": "cpu-whisper"})
    )
    (root / "broken").mkdir()
    (root / "broken/run.sh").write_text("#!/bin/sh\n")
    (root / "broken/run.sh").chmod(0o755)
    (root / "broken/metadata.json").write_text("{not json")

    call_command("backends", "scan")
    scanned = capsys.readouterr().out
    assert "3 backend(s) recorded" in scanned and "broken: metadata.json is not valid JSON" in scanned
    call_command("backends", "list", "--json")
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}

    assert rows["cpu-whisper"]["installed_version"] == "1.4.0"
    assert rows["cpu-whisper"]["gallery"] == "test"
    assert rows["whisper"]["problem"] == ""
    assert "not valid JSON" in rows["broken"]["problem"]
    assert InstalledVersion.objects.get(name="whisper").meta_backend_for == "cpu-whisper"
    assert set(rows["cpu-whisper"]) >= {
        "name",
        "installed_version",
        "installed_digest",
        "available_version",
        "available_digest",
        "upgrade_available",
        "reason",
        "pinned",
    }


def test_commands_install_upgrade_and_report_failures_with_exit_status(
    published: Any, settings: Any, capsys: Any
) -> None:
    call_command("backends", "install", "cpu-demo")
    assert "installed" in capsys.readouterr().out
    published.push("v2")
    call_command("backends", "upgrade", "cpu-demo", "--json")
    [outcome] = json.loads(capsys.readouterr().out)
    assert outcome["status"] == "succeeded" and outcome["from_digest"] == published.first_digest
    job = UpgradeJob.objects.get(pk=outcome["job"])
    assert job.requested_by.startswith("cli:") and job.duration is not None
    call_command("backends", "pin", "cpu-demo")
    published.push("v3")
    with pytest.raises(CommandError):
        call_command("backends", "upgrade", "cpu-demo")
    assert "pinned" in capsys.readouterr().err
    with pytest.raises(CommandError, match="no backend named"):
        call_command("backends", "install", "nope")


def test_the_local_node_is_used_for_operations(published: Any, settings: Any) -> None:
    job = run_op(published.backend, JobKind.INSTALL)
    assert job.node == Node.local()


def test_a_trickling_registry_fails_an_install_from_the_command_line_naming_the_limit(
    published: Any, settings: Any, registry: Any, fault_proxy_factory: Any, gallery_factory: Any, capsys: Any
) -> None:
    from tests.registry import Fault

    proxy = fault_proxy_factory(registry.host)
    # One byte every half second, for every try: the layer would take minutes to arrive.
    proxy.add(Fault(lambda method, path: method == "GET" and "/blobs/" in path, trickle_after=0, times=10))
    gallery_factory([{"name": "cpu-demo", "uri": published.ref.replace(registry.host, proxy.host)}])
    settings.PORTAL_REGISTRY_SPEED_LIMIT = 1000
    settings.PORTAL_REGISTRY_SPEED_TIME = 1
    settings.PORTAL_REGISTRY_RETRIES = 1

    with pytest.raises(CommandError, match="did not succeed"):
        call_command("backends", "install", "cpu-demo")

    job = UpgradeJob.objects.get(kind=JobKind.INSTALL)
    assert job.status == JobStatus.FAILED
    assert "low-speed limit of 1000 bytes/s over 1 s" in job.error, job.error
    assert not (Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo").exists()
    assert [
        p for p in Path(settings.PORTAL_STATE_PATH).rglob("*") if p.is_file() and "journal" not in p.parts
    ] == []


@pytest.fixture
def small_disk(tmp_path: Path, settings: Any) -> Any:
    """A real 4 MiB filesystem (tmpfs) holding the backends and state directories."""
    import subprocess

    from tests.conftest import missing_service

    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        missing_service(f"cannot mount a tmpfs (needs root): {done.stderr.decode().strip()}")
    settings.PORTAL_BACKENDS_PATH = mount / "backends"
    settings.PORTAL_STATE_PATH = mount / ".backends-portal"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.single_pass
def test_running_out_of_space_mid_download_is_a_clean_failure(
    published: Any, settings: Any, small_disk: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(procedure, "SPACE_MARGIN", 0)  # the disk is tiny; only the estimate counts
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    # 16 MiB of zeros compress to a few KiB: the space check passes, the unpacked tree cannot fit.
    published.push("v2", extra={"lib/model.bin": b"\0" * (16 << 20)})

    job = run_op(published.backend, JobKind.UPGRADE)

    assert job.status == JobStatus.FAILED
    assert "No space left on device" in job.error
    assert live_version(settings, "cpu-demo") == "v1"
    assert json.loads((Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo/metadata.json").read_text())[
        "digest"
    ] == (published.first_digest)
    assert [p for p in (small_disk / ".backends-portal/staging").rglob("*") if p.is_file()] == []
    assert InstalledVersion.objects.get(name="cpu-demo", state="current").digest == published.first_digest


@pytest.mark.single_pass
def test_a_disk_filling_up_mid_swap_leaves_its_space_free_for_the_next_install(
    published: Any, settings: Any, small_disk: Path, monkeypatch: Any
) -> None:
    import errno
    import os

    from backends_app.models import JobPhase

    monkeypatch.setattr(procedure, "SPACE_MARGIN", 0)  # the disk is tiny; only the estimate counts
    assert run_op(published.backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
    free_before = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    # 2.5 MiB of zeros: a few KiB to download, most of the disk once staged.
    published.push("v2", extra={"lib/model.bin": b"\0" * (5 << 19)})
    filler = small_disk / "someone-elses-file"

    def fill_the_disk_when_swapping(job: UpgradeJob) -> None:
        """Another writer on the same filesystem takes the rest of it just as the swap begins."""
        if job.phase == JobPhase.SWAPPING and not filler.exists():
            with filler.open("wb", buffering=0) as handle:
                try:
                    while True:
                        handle.write(b"\1" * 65536)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

    job, _ = published.backend.request(JobKind.UPGRADE, queue=False, requested_by="test")
    job = jobs.run(job.pk, observer=fill_the_disk_when_swapping)

    assert job.status == JobStatus.FAILED
    assert "No space left on device" in job.error, job.error
    assert live_version(settings, "cpu-demo") == "v1"
    filler.unlink()  # the other writer frees its space; the failed upgrade must have freed its own
    free_after = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    assert free_after >= free_before - (64 << 10), (free_before, free_after)
    left = sorted(str(p.relative_to(small_disk)) for p in small_disk.rglob("*") if p.is_file())
    assert [path for path in left if "/journal/" not in f"/{path}"] == [
        "backends/cpu-demo/lib/version.txt",
        "backends/cpu-demo/metadata.json",
        "backends/cpu-demo/run.sh",
    ]

    # A smaller upgrade that fits the disk as it was before the failure goes through.
    published.push("v3", extra={"lib/model.bin": b"\0" * (2 << 20)})
    upgrade = run_op(published.backend, JobKind.UPGRADE)
    assert upgrade.status == JobStatus.SUCCEEDED, upgrade.error
    assert live_version(settings, "cpu-demo") == "v3"


def test_upgrade_all_checks_first_and_dry_run_changes_nothing(
    published: Any, settings: Any, capsys: Any
) -> None:
    call_command("backends", "install", "cpu-demo")
    second = published.push("v2")
    capsys.readouterr()

    call_command("backends", "upgrade", "--all", "--dry-run", "--json")
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "cpu-demo" and row["upgrade_available"] is True and row["reason"]
    assert live_version(settings, "cpu-demo") == "v1"
    assert not UpgradeJob.objects.filter(kind=JobKind.UPGRADE).exists()

    call_command("backends", "check", "--json")
    [checked] = json.loads(capsys.readouterr().out)
    assert checked["available_digest"] == second and checked["upgrade_available"] is True

    call_command("backends", "upgrade", "--all")
    assert live_version(settings, "cpu-demo") == "v2"
    capsys.readouterr()
    call_command("backends", "upgrade", "--all", "--dry-run")
    assert capsys.readouterr().out == "All backends are up to date.\n"
