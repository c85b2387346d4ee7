"""Backends whose gallery uri is an archive over HTTP (a real server on loopback) or file://: the
sha256 is checked before a single entry is extracted, the extraction follows the unpacker's rules,
downloads resume with Range, and a gallery without sha256 installs with a warning unless integrity
is required."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends_app import detection, jobs
from backends_app.models import Backend, Gallery, InstalledVersion, JobKind, JobStatus
from tests.conftest import run_op
from tests.helpers.files import Cut, FilesServer, Symlink, backend_files, sha256, tar_bytes, zip_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def server() -> Iterator[FilesServer]:
    files = FilesServer()
    try:
        yield files
    finally:
        files.stop()


def gallery(tmp_path: Path, entries: list[dict[str, Any]]) -> Gallery:
    path = tmp_path / "index.yaml"
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    row, _ = Gallery.objects.update_or_create(name="test", defaults={"url": path.as_uri()})
    result = row.sync(force=True)
    assert result.ok, result.error
    return row


def live(settings: Any, name: str) -> Path:
    return Path(settings.PORTAL_BACKENDS_PATH) / name


def staged_leftovers(settings: Any) -> list[Path]:
    return [p for p in Path(settings.PORTAL_STATE_PATH, "staging").rglob("*") if not p.is_dir()]


def test_a_tarball_with_its_sha256_installs_and_records_the_archive_digest(
    server: FilesServer, tmp_path: Path, settings: Any
) -> None:
    data = tar_bytes(backend_files("v1"))
    server.files["/cpu-tar.tar.gz"] = data
    gallery(tmp_path, [{"name": "cpu-tar", "uri": server.url("/cpu-tar.tar.gz"), "sha256": sha256(data)}])

    job = run_op(Backend.objects.lookup("cpu-tar"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert (live(settings, "cpu-tar") / "run.sh").read_text() == "#!/bin/sh\necho v1\n"
    assert os.access(live(settings, "cpu-tar") / "run.sh", os.X_OK)
    metadata = json.loads((live(settings, "cpu-tar") / "metadata.json").read_text())
    assert metadata["digest"] == f"sha256:{sha256(data)}" and metadata["uri"] == server.url("/cpu-tar.tar.gz")
    row = InstalledVersion.objects.get(name="cpu-tar", state="current")
    assert row.digest == f"sha256:{sha256(data)}"
    assert "not verified" not in job.message
    assert job.bytes_done == len(data)
    assert staged_leftovers(settings) == []


def test_a_sha256_mismatch_refuses_before_extracting_and_names_both_digests(
    server: FilesServer, tmp_path: Path, settings: Any
) -> None:
    data = tar_bytes(backend_files("v1"))
    server.files["/cpu-tar.tar.gz"] = data
    declared = sha256(b"something else")
    gallery(tmp_path, [{"name": "cpu-tar", "uri": server.url("/cpu-tar.tar.gz"), "sha256": declared}])

    job = run_op(Backend.objects.lookup("cpu-tar"), JobKind.INSTALL)

    assert job.status == JobStatus.FAILED
    assert sha256(data) in job.error and declared in job.error and "sha256 mismatch" in job.error
    assert not live(settings, "cpu-tar").exists()
    assert (
        staged_leftovers(settings) == [] and list(Path(settings.PORTAL_STATE_PATH, "trash").iterdir()) == []
    )


def test_a_missing_sha256_installs_with_a_warning_unless_integrity_is_required(
    server: FilesServer, tmp_path: Path, settings: Any
) -> None:
    server.files["/cpu-tar.tar.xz"] = tar_bytes(backend_files("v1"), "xz")
    gallery(tmp_path, [{"name": "cpu-tar", "uri": server.url("/cpu-tar.tar.xz")}])
    settings.PORTAL_REQUIRE_BACKEND_INTEGRITY = True

    refused = run_op(Backend.objects.lookup("cpu-tar"), JobKind.INSTALL)

    assert refused.status == JobStatus.FAILED
    assert refused.error == 'strict integrity: backend "cpu-tar" has no SHA256 (gallery "test")'
    assert server.log == []  # refused before any download

    settings.PORTAL_REQUIRE_BACKEND_INTEGRITY = False
    job = run_op(Backend.objects.lookup("cpu-tar"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert "no sha256 in the gallery: the archive was not verified" in job.message
    assert (live(settings, "cpu-tar") / "lib/version.txt").read_text() == "v1"


@pytest.mark.parametrize("compression", ["", "gz", "xz", "bz2", "zst", "zip"])
def test_every_archive_format_is_recognised_by_content(
    compression: str, server: FilesServer, tmp_path: Path, settings: Any
) -> None:
    files = {**backend_files("v1"), "lib/libx.so.1": "x", "lib/libx.so": Symlink("libx.so.1")}
    data = zip_bytes(files) if compression == "zip" else tar_bytes(files, compression)
    server.files["/download?id=7"] = data  # no extension: the content decides
    gallery(tmp_path, [{"name": "cpu-any", "uri": server.url("/download?id=7"), "sha256": sha256(data)}])

    job = run_op(Backend.objects.lookup("cpu-any"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert (live(settings, "cpu-any") / "lib/version.txt").read_text() == "v1"
    assert os.readlink(live(settings, "cpu-any") / "lib/libx.so") == "libx.so.1"  # safe links are kept
    assert os.access(live(settings, "cpu-any") / "run.sh", os.X_OK)


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ({**backend_files("v2"), "../escaped": "x"}, "'..' in path"),
        ({**backend_files("v2"), "/etc/cron.d/x": "x"}, "absolute path"),
        ({**backend_files("v2"), "lib/out": Symlink("../../outside")}, "outside the target"),
        ({**backend_files("v2"), "lib/abs": Symlink("/etc/passwd")}, "absolute path"),
        ({**backend_files("v2"), "lib/up": Symlink(".."), "lib/up/escaped": "x"}, "through the symlink"),
    ],
    ids=["dotdot", "absolute-name", "link-escape", "absolute-link", "write-through-link"],
)
def test_an_archive_with_an_escaping_entry_is_refused_and_the_old_version_stays(
    entries: dict[str, Any], why: str, server: FilesServer, tmp_path: Path, settings: Any
) -> None:
    good = tar_bytes(backend_files("v1"))
    server.files["/v1.tar.gz"] = good
    gallery(tmp_path, [{"name": "cpu-tar", "uri": server.url("/v1.tar.gz"), "sha256": sha256(good)}])
    assert run_op(Backend.objects.lookup("cpu-tar"), JobKind.INSTALL).status == JobStatus.SUCCEEDED
    evil = tar_bytes(entries)
    server.files["/v2.tar.gz"] = evil
    gallery(tmp_path, [{"name": "cpu-tar", "uri": server.url("/v2.tar.gz"), "sha256": sha256(evil)}])

    job = run_op(Backend.objects.lookup("cpu-tar"), JobKind.UPGRADE)

    assert job.status == JobStatus.FAILED and why in job.error, job.error
    assert (live(settings, "cpu-tar") / "lib/version.txt").read_text() == "v1"
    assert (
        not (tmp_path / "escaped").exists() and not (Path(settings.PORTAL_BACKENDS_PATH) / "escaped").exists()
    )
    assert staged_leftovers(settings) == []


def test_a_download_cut_off_resumes_with_a_range_request(
    server: FilesServer, tmp_path: Path, settings: Any
) -> None:
    # Bytes are handed on in chunks of up to 1 MiB: a cut after 1.5 MiB resumes after the first.
    data = tar_bytes({**backend_files("v1"), "lib/blob": os.urandom(3_000_000)})
    server.files["/cpu-tar.tar.gz"] = data
    server.cuts.append(Cut("/cpu-tar.tar.gz", after=1_500_000))
    gallery(tmp_path, [{"name": "cpu-tar", "uri": server.url("/cpu-tar.tar.gz"), "sha256": sha256(data)}])

    job = run_op(Backend.objects.lookup("cpu-tar"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    requests_made = server.gets("/cpu-tar.tar.gz")
    assert len(requests_made) == 2
    assert requests_made[0][2:] == ("", 200)
    assert requests_made[1][2].startswith("bytes=") and requests_made[1][3] == 206
    assert int(requests_made[1][2][len("bytes=") : -1]) > 0  # it went on from where the cut was


def test_a_server_without_ranges_is_read_again_from_the_start(
    server: FilesServer, tmp_path: Path, settings: Any
) -> None:
    data = tar_bytes({**backend_files("v1"), "lib/blob": os.urandom(300_000)})
    server.ranges = False
    server.files["/cpu-tar.tar.gz"] = data
    server.cuts.append(Cut("/cpu-tar.tar.gz", after=100_000))
    gallery(tmp_path, [{"name": "cpu-tar", "uri": server.url("/cpu-tar.tar.gz"), "sha256": sha256(data)}])

    job = run_op(Backend.objects.lookup("cpu-tar"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert [(r, s) for _, _, r, s in server.gets("/cpu-tar.tar.gz")] == [("", 200), ("", 200)]


def test_a_missing_archive_falls_back_to_the_mirror(
    server: FilesServer, tmp_path: Path, settings: Any
) -> None:
    data = tar_bytes(backend_files("v1"))
    server.files["/mirror/cpu-tar.tar.gz"] = data
    gallery(
        tmp_path,
        [
            {
                "name": "cpu-tar",
                "uri": server.url("/gone/cpu-tar.tar.gz"),
                "mirrors": [server.url("/mirror/cpu-tar.tar.gz")],
                "sha256": sha256(data),
            }
        ],
    )

    job = run_op(Backend.objects.lookup("cpu-tar"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.source == server.url("/mirror/cpu-tar.tar.gz") and "HTTP 404" in job.message
    metadata = json.loads((live(settings, "cpu-tar") / "metadata.json").read_text())
    assert metadata["uri"] == server.url("/mirror/cpu-tar.tar.gz")  # what was installed


def test_a_file_archive_is_read_locally_and_confined_to_the_source_roots(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, settings: Any
) -> None:
    data = zip_bytes(backend_files("v1"))
    inside = tmp_path / "archives" / "cpu-zip.zip"
    inside.parent.mkdir()
    inside.write_bytes(data)
    outside = tmp_path_factory.mktemp("elsewhere") / "cpu-zip.zip"
    outside.write_bytes(data)
    gallery(tmp_path, [{"name": "cpu-zip", "uri": outside.as_uri(), "sha256": sha256(data)}])

    refused = run_op(Backend.objects.lookup("cpu-zip"), JobKind.INSTALL)

    assert (
        refused.status == JobStatus.FAILED
        and "is not below a directory backends may come from" in refused.error
    )

    gallery(tmp_path, [{"name": "cpu-zip", "uri": inside.as_uri(), "sha256": sha256(data)}])
    job = run_op(Backend.objects.lookup("cpu-zip"), JobKind.INSTALL)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert (live(settings, "cpu-zip") / "lib/version.txt").read_text() == "v1"


def test_the_check_compares_an_archives_sha256_and_a_same_sha256_upgrade_downloads_nothing(
    server: FilesServer, tmp_path: Path, settings: Any
) -> None:
    v1 = tar_bytes(backend_files("v1"))
    v2 = tar_bytes(backend_files("v2"))
    server.files["/v1.tar.gz"], server.files["/v2.tar.gz"] = v1, v2
    gallery(tmp_path, [{"name": "cpu-tar", "uri": server.url("/v1.tar.gz"), "sha256": sha256(v1)}])
    assert run_op(Backend.objects.lookup("cpu-tar"), JobKind.INSTALL).status == JobStatus.SUCCEEDED
    assert detection.find_upgrades(sync_galleries=False).rows[0]["upgrade_available"] is False

    gallery(tmp_path, [{"name": "cpu-tar", "uri": server.url("/v2.tar.gz"), "sha256": sha256(v2)}])
    report = detection.find_upgrades(sync_galleries=False)
    [row] = report.rows
    assert row["upgrade_available"] is True
    assert (
        row["reason"] == f"archive sha256 changed: sha256:{sha256(v1)[:12]}.. -> sha256:{sha256(v2)[:12]}.."
    )
    assert report.request_counts == {} and len(server.log) == 1  # the check downloaded nothing
    assert run_op(Backend.objects.lookup("cpu-tar"), JobKind.UPGRADE).status == JobStatus.SUCCEEDED
    assert (live(settings, "cpu-tar") / "lib/version.txt").read_text() == "v2"

    # A version bump with the same archive: flagged as metadata only, upgraded without a download.
    gallery(
        tmp_path,
        [{"name": "cpu-tar", "uri": server.url("/v2.tar.gz"), "sha256": sha256(v2), "version": "2.0.1"}],
    )
    [row] = detection.find_upgrades(sync_galleries=False).rows
    assert row["upgrade_available"] is True and "metadata only: no download" in row["reason"]
    downloads = len(server.log)
    job = run_op(Backend.objects.lookup("cpu-tar"), JobKind.UPGRADE)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert "metadata only: no download" in job.message and len(server.log) == downloads
    metadata = json.loads((live(settings, "cpu-tar") / "metadata.json").read_text())
    assert metadata["version"] == "2.0.1" and metadata["digest"] == f"sha256:{sha256(v2)}"


def test_an_external_archive_install_takes_its_name_from_the_file(server: FilesServer, settings: Any) -> None:
    data = tar_bytes(backend_files("v1"))
    server.files["/cpu-ext.tar.gz"] = data
    backend = Backend.objects.external(server.url("/cpu-ext.tar.gz"), sha256=sha256(data))
    assert backend.name == "cpu-ext" and backend.gallery.name == "external"
    job, _ = backend.request(JobKind.INSTALL, queue=False)
    job = jobs.run(job.pk)
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert (live(settings, "cpu-ext") / "lib/version.txt").read_text() == "v1"
