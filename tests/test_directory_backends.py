"""Backends whose gallery uri is a local directory: copied through the same staged, journaled,
health-checked procedure as images, never reading outside the source tree, confined to the
directories backends may come from unless the command line names them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends_app import detection, jobs, procedure, sources
from backends_app.models import Backend, Gallery, InstalledVersion, JobKind, JobStatus, Node
from tests.conftest import run_op
from tests.helpers.files import Symlink, backend_files, write_tree
from tests.test_crash_recovery import crash

pytestmark = pytest.mark.django_db


def backends_dir(settings: Any) -> Path:
    path = Path(settings.PORTAL_BACKENDS_PATH)
    path.mkdir(parents=True, exist_ok=True)
    return path


def gallery_at(path: Path, entries: list[dict[str, Any]], name: str = "test") -> Gallery:
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    gallery, _ = Gallery.objects.update_or_create(name=name, defaults={"url": path.as_uri()})
    result = gallery.sync(force=True)
    assert result.ok, result.error
    return gallery


def upgrade(name: str) -> Any:
    backend = Backend.objects.lookup(name)
    job, created = backend.request(JobKind.UPGRADE, queue=False, requested_by="test")
    assert created
    return jobs.run(job.pk)


def test_a_directory_backend_upgrades_from_v1_to_v2_with_metadata_saying_2_0_0(settings: Any) -> None:
    """LocalAI's "should upgrade the backend and update metadata" (ui_api_backends_test.go), at the
    model level: v1 installed by LocalAI, the gallery in the backends directory names a v2 directory."""
    backends = backends_dir(settings)
    v1 = write_tree(backends / "test-upgrade-backend", backend_files("v1"))
    (v1 / "metadata.json").write_text(
        json.dumps(
            {"name": "test-upgrade-backend", "version": "1.0.0", "installed_at": "2026-01-01T00:00:00Z"}
        )
    )
    source = write_tree(backends / "v2-backend-src", backend_files("v2"))
    index = backends / "test-gallery.yaml"
    gallery_at(index, [{"name": "test-upgrade-backend", "uri": str(source), "version": "2.0.0"}])
    procedure.record_disk_state(Node.local())  # what the worker's watch records of LocalAI's install

    job = upgrade("test-upgrade-backend")

    assert job.status == JobStatus.SUCCEEDED, job.error
    live = backends / "test-upgrade-backend"
    assert "v2" in (live / "run.sh").read_text()
    raw = (live / "metadata.json").read_text()
    assert '"version": "2.0.0"' in raw
    metadata = json.loads(raw)
    digest = sources.tree_digest(live)
    expected = (
        "{\n"
        '  "name": "test-upgrade-backend",\n'
        f'  "gallery_url": "{index.as_uri()}",\n'
        f'  "installed_at": "{metadata["installed_at"]}",\n'
        '  "version": "2.0.0",\n'
        f'  "uri": "{source}",\n'
        f'  "digest": "{digest}"\n'
        "}"
    )
    assert raw == expected  # LocalAI's bytes, plus the tree digest it does not record
    assert job.from_version == "1.0.0" and job.to_version == "2.0.0" and job.to_digest == digest
    rows = InstalledVersion.objects.filter(name="test-upgrade-backend")
    assert rows.get(state="current").version == "2.0.0" and rows.get(state="current").digest == digest
    kept = Path(rows.get(state="kept").path)
    assert (kept / "run.sh").read_text() == "#!/bin/sh\necho v1\n"  # v1 kept for rollback
    assert (source / "run.sh").read_text() == "#!/bin/sh\necho v2\n"  # the source is left as it was

    rollback = run_op(Backend.objects.lookup("test-upgrade-backend"), JobKind.ROLLBACK)
    assert rollback.status == JobStatus.SUCCEEDED, rollback.error
    assert "v1" in (live / "run.sh").read_text()


def test_the_check_flags_a_directory_backend_by_its_declared_version_without_any_request(
    settings: Any, tmp_path: Path
) -> None:
    source = write_tree(tmp_path / "src" / "cpu-dir", backend_files("v1"))
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-dir", "uri": str(source), "version": "1.0.0"}])
    assert run_op(Backend.objects.lookup("cpu-dir"), JobKind.INSTALL).status == JobStatus.SUCCEEDED
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-dir", "uri": str(source), "version": "1.1.0"}])

    report = detection.find_upgrades(sync_galleries=False)

    [row] = report.rows
    assert row["upgrade_available"] is True and row["reason"] == "version 1.0.0 -> 1.1.0"
    assert report.request_counts == {}  # no registry was asked anything
    assert Backend.objects.get(name="cpu-dir").upgrade_available


def test_an_unchanged_directory_upgrades_by_rewriting_metadata_only(settings: Any, tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src" / "cpu-dir", backend_files("v1"))
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-dir", "uri": str(source), "version": "1.0.0"}])
    assert run_op(Backend.objects.lookup("cpu-dir"), JobKind.INSTALL).status == JobStatus.SUCCEEDED
    live = backends_dir(settings) / "cpu-dir"
    inode = live.stat().st_ino
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-dir", "uri": str(source), "version": "1.0.1"}])

    job = upgrade("cpu-dir")

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert "metadata only: no download" in job.message
    assert live.stat().st_ino == inode  # not swapped: the same directory
    assert json.loads((live / "metadata.json").read_text())["version"] == "1.0.1"
    assert not InstalledVersion.objects.filter(name="cpu-dir", state="kept").exists()


def test_a_directory_outside_the_source_roots_is_refused_unless_the_command_line_names_it(
    settings: Any, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = write_tree(tmp_path_factory.mktemp("elsewhere") / "cpu-far", backend_files("far"))
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-far", "uri": str(outside)}])

    job = run_op(Backend.objects.lookup("cpu-far"), JobKind.INSTALL)

    assert job.status == JobStatus.FAILED
    assert "is not below a directory backends may come from" in job.error and str(tmp_path) in job.error
    assert not (backends_dir(settings) / "cpu-far").exists()

    # A web request is accepted, as LocalAI accepts it; the job refuses the path, on its node.
    web = Backend.objects.external(str(outside), name="cpu-far-web")
    job, _ = web.request(JobKind.INSTALL, queue=False)
    job = jobs.run(job.pk)
    assert job.status == JobStatus.FAILED and "not below a directory backends may come from" in job.error
    assert not (backends_dir(settings) / "cpu-far-web").exists()

    trusted = Backend.objects.external(str(outside), from_command_line=True)
    assert trusted.name == "cpu-far"  # LocalAI's default: the directory's own name
    job, _ = trusted.request(JobKind.INSTALL, queue=False)
    job = jobs.run(job.pk)
    assert job.status == JobStatus.SUCCEEDED, job.error
    live = backends_dir(settings) / "cpu-far"
    assert (live / "lib/version.txt").read_text() == "far"
    metadata = json.loads((live / "metadata.json").read_text())
    assert "gallery_url" not in metadata and metadata["uri"] == str(outside)
    assert InstalledVersion.objects.get(name="cpu-far", state="current").backend == trusted

    settings.PORTAL_BACKEND_SOURCE_ROOTS = [outside.parent]
    assert run_op(Backend.objects.lookup("test@cpu-far"), JobKind.INSTALL).status == JobStatus.SUCCEEDED


def test_a_source_holding_the_state_directory_is_refused(settings: Any, tmp_path: Path) -> None:
    backend = Backend.objects.external(str(tmp_path), name="everything", from_command_line=True)
    job, _ = backend.request(JobKind.INSTALL, queue=False)
    job = jobs.run(job.pk)
    assert job.status == JobStatus.FAILED and "state directory" in job.error
    assert not (backends_dir(settings) / "everything").exists()


def test_links_inside_the_tree_are_kept_and_absolute_ones_into_it_made_relative(
    settings: Any, tmp_path: Path
) -> None:
    root = tmp_path / "src" / "cpu-links"
    source = write_tree(
        root,
        {
            **backend_files("v1"),
            "lib/libx.so.1": "x",
            "lib/libx.so": Symlink("libx.so.1"),
            "bin/libx": Symlink(str(root / "lib" / "libx.so.1")),
            "metadata.json": '{"name": "not copied"}',
        },
    )
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-links", "uri": str(source)}])

    job = run_op(Backend.objects.lookup("cpu-links"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    live = backends_dir(settings) / "cpu-links"
    assert os.readlink(live / "lib/libx.so") == "libx.so.1"
    assert os.readlink(live / "bin/libx") == "../lib/libx.so.1"
    assert (live / "bin/libx").read_text() == "x"
    assert json.loads((live / "metadata.json").read_text())["name"] == "cpu-links"
    digest = InstalledVersion.objects.get(name="cpu-links", state="current").digest
    assert digest == sources.tree_digest(live) == json.loads((live / "metadata.json").read_text())["digest"]


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"lib/escape": Symlink("../../../../etc")}, "outside the target"),
        ({"lib/passwd": Symlink("/etc/passwd")}, "absolute path"),
        ({"libs": Symlink("/usr/lib")}, "absolute path"),
    ],
    ids=["relative-escape", "absolute-file", "absolute-directory"],
)
def test_a_link_leading_out_of_the_tree_refuses_it_and_keeps_the_installed_version(
    files: dict[str, Any], why: str, settings: Any, tmp_path: Path
) -> None:
    source = write_tree(tmp_path / "src" / "cpu-evil", backend_files("v1"))
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-evil", "uri": str(source), "version": "1"}])
    assert run_op(Backend.objects.lookup("cpu-evil"), JobKind.INSTALL).status == JobStatus.SUCCEEDED
    write_tree(source, {**backend_files("v2"), **files})
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-evil", "uri": str(source), "version": "2"}])

    job = upgrade("cpu-evil")

    assert job.status == JobStatus.FAILED and why in job.error, job.error
    live = backends_dir(settings) / "cpu-evil"
    assert (live / "lib/version.txt").read_text() == "v1"
    assert (
        list(Path(settings.PORTAL_STATE_PATH, "staging", "cpu-evil").iterdir()) == []
    )  # nothing staged stays


def test_special_files_refuse_the_tree(settings: Any, tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src" / "cpu-fifo", backend_files("v1"))
    os.mkfifo(source / "lib" / "pipe")
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-fifo", "uri": str(source)}])
    job = run_op(Backend.objects.lookup("cpu-fifo"), JobKind.INSTALL)
    assert job.status == JobStatus.FAILED and "'lib/pipe' is a FIFO" in job.error
    assert not (backends_dir(settings) / "cpu-fifo").exists()


def test_a_directory_without_run_sh_is_not_installed(settings: Any, tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src" / "cpu-empty", {"lib/version.txt": "v1"})
    gallery_at(tmp_path / "index.yaml", [{"name": "cpu-empty", "uri": str(source)}])
    job = run_op(Backend.objects.lookup("cpu-empty"), JobKind.INSTALL)
    assert job.status == JobStatus.FAILED and "run.sh missing" in job.error
    assert not (backends_dir(settings) / "cpu-empty").exists()


def test_the_tree_digest_names_content_modes_and_links(tmp_path: Path) -> None:
    one = write_tree(tmp_path / "one", {**backend_files("v1"), "lib/l": Symlink("version.txt")})
    two = write_tree(tmp_path / "two", {**backend_files("v1"), "lib/l": Symlink("version.txt")})
    assert sources.tree_digest(one) == sources.tree_digest(two)
    (two / "metadata.json").write_text("{}")
    assert sources.tree_digest(one) == sources.tree_digest(two)  # the portal's own file is left out
    (two / "lib/version.txt").chmod(0o755)
    assert sources.tree_digest(one) != sources.tree_digest(two)
    (two / "lib/version.txt").chmod(0o644)
    (two / "lib/l").unlink()
    (two / "lib/l").symlink_to("../run.sh")
    assert sources.tree_digest(one) != sources.tree_digest(two)


CRASH_STEPS = ["resolved", "downloading", "downloaded", "staged", "before-swap", "swapped", "confirmed"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
@pytest.mark.parametrize("step", CRASH_STEPS)
def test_sigkill_during_a_directory_upgrade_leaves_the_backend_whole(
    step: str, settings: Any, tmp_path: Path
) -> None:
    """The real command in a child process killed at each step; after reconcile the backend is all
    v1 (before the confirmation) or all v2 (from it on), and its rows say so."""
    source = write_tree(tmp_path / "src" / "cpu-dir", backend_files("v1"))
    index = tmp_path / "index.yaml"
    gallery_at(index, [{"name": "cpu-dir", "uri": str(source), "version": "1.0.0"}])
    assert run_op(Backend.objects.lookup("cpu-dir"), JobKind.INSTALL).status == JobStatus.SUCCEEDED
    write_tree(source, {**backend_files("v2"), "lib/more.bin": os.urandom(2_000_000)})
    gallery_at(index, [{"name": "cpu-dir", "uri": str(source), "version": "2.0.0"}])
    detection.find_upgrades(sync_galleries=False)

    done = crash(["upgrade", "cpu-dir", "--force"], step)

    assert done.returncode == -9, f"the child did not die at {step}:\n{done.stdout}\n{done.stderr}"
    procedure.reconcile()
    live = backends_dir(settings) / "cpu-dir"
    expected = "v2" if step == "confirmed" else "v1"
    assert (live / "lib/version.txt").read_text() == expected
    assert (live / "run.sh").read_text() == f"#!/bin/sh\necho {expected}\n"
    metadata = json.loads((live / "metadata.json").read_text())
    assert metadata["version"] == ("2.0.0" if expected == "v2" else "1.0.0")
    assert metadata["digest"] == sources.tree_digest(live)  # the tree is the one its metadata names
    assert InstalledVersion.objects.get(name="cpu-dir", state="current").digest == metadata["digest"]
    state = Path(settings.PORTAL_STATE_PATH)
    assert [p for p in (state / "staging").rglob("*") if not p.is_dir()] == []
    assert list((state / "journal").glob("*.json")) == [] and list((state / "trash").iterdir()) == []

    again = upgrade("cpu-dir")  # and it can be worked on again
    assert again.status == JobStatus.SUCCEEDED, again.error
    assert (live / "lib/version.txt").read_text() == "v2"
