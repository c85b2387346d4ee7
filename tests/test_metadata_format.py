"""metadata.json byte for byte as LocalAI's Go code writes it (core/gallery/backend_types.go struct
order, json.MarshalIndent with two spaces, no trailing newline, Go's escaping), for a concrete
backend, a meta backend, and an upgrade that only rewrites metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from backends_app import detection
from backends_app.disk import layout
from backends_app.models import Backend, JobKind, JobStatus
from tests.conftest import image, run_op
from tests.registry import FaultProxy, RegistryServer


def test_a_concrete_backends_file_is_localais_bytes(tmp_path: Path) -> None:
    # core/gallery/backends.go InstallBackend, from the contract's example.
    metadata = layout.BackendMetadata(
        name="cpu-llama-cpp",
        alias="llama-cpp",
        gallery_url="https://index.localai.io/backends",
        installed_at="2026-08-22T20:44:03Z",
        uri="quay.io/go-skynet/local-ai-backends:latest-cpu-llama-cpp",
        digest="sha256:4e1a",
    )
    layout.write_metadata(tmp_path, metadata)
    assert (tmp_path / "metadata.json").read_bytes() == (
        b"{\n"
        b'  "alias": "llama-cpp",\n'
        b'  "name": "cpu-llama-cpp",\n'
        b'  "gallery_url": "https://index.localai.io/backends",\n'
        b'  "installed_at": "2026-08-22T20:44:03Z",\n'
        b'  "uri": "quay.io/go-skynet/local-ai-backends:latest-cpu-llama-cpp",\n'
        b'  "digest": "sha256:4e1a"\n'
        b"}"
    )
    assert (tmp_path / "metadata.json").stat().st_mode & 0o777 == 0o644


def test_every_key_in_struct_order_and_gos_escaping(tmp_path: Path) -> None:
    metadata = layout.BackendMetadata(
        digest="sha256:ab",
        uri="https://example.com/a?b=1&c=<2>",
        version="2.0\u2028\u2029",
        installed_at="2026-08-22T22:44:03+02:00",
        gallery_url="file:///srv/gallery.yaml",
        name='tab\there "quoted" back\\slash \b\f\x01 caf\u00e9 \ud800',
        meta_backend_for="x",
        alias="a&b",
    )
    layout.write_metadata(tmp_path, metadata)
    expected = (
        "{\n"
        '  "alias": "a\\u0026b",\n'
        '  "meta_backend_for": "x",\n'
        '  "name": "tab\\there \\"quoted\\" back\\\\slash \\b\\f\\u0001 caf\u00e9 \ufffd",\n'
        '  "gallery_url": "file:///srv/gallery.yaml",\n'
        '  "installed_at": "2026-08-22T22:44:03+02:00",\n'
        '  "version": "2.0\\u2028\\u2029",\n'
        '  "uri": "https://example.com/a?b=1\\u0026c=\\u003c2\\u003e",\n'
        '  "digest": "sha256:ab"\n'
        "}"
    )
    assert (tmp_path / "metadata.json").read_bytes() == expected.encode()
    # And it reads back to the same values (a lone surrogate becomes U+FFFD, as Go decodes it).
    again = layout.read_metadata(tmp_path)
    assert again.uri == metadata.uri and again.version == metadata.version and again.alias == "a&b"


@pytest.mark.registry
@pytest.mark.django_db
def test_a_meta_backends_file_has_the_concretes_version_and_no_alias(
    registry: RegistryServer, gallery_factory: Any, settings: Any
) -> None:
    ref = registry.push_image(image("cpu-1"), tag="latest")
    gallery = gallery_factory(
        [
            {"name": "demo", "alias": "demo", "capabilities": {"default": "cpu-demo"}},
            {"name": "cpu-demo", "uri": ref, "alias": "demo", "version": "1.2.3"},
        ]
    )

    job = run_op(Backend.objects.lookup("demo"), JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    raw = (Path(settings.PORTAL_BACKENDS_PATH) / "demo/metadata.json").read_text()
    installed_at = json.loads(raw)["installed_at"]
    assert raw == (
        "{\n"
        '  "meta_backend_for": "cpu-demo",\n'
        '  "name": "demo",\n'
        f'  "gallery_url": "{gallery.url}",\n'
        f'  "installed_at": "{installed_at}",\n'
        '  "version": "1.2.3"\n'
        "}"
    )


@pytest.mark.registry
@pytest.mark.django_db
def test_a_version_bump_on_an_unmoved_tag_is_an_upgrade_of_metadata_only_with_no_blob_fetched(
    registry: RegistryServer, gallery_factory: Any, fault_proxy_factory: Any, settings: Any
) -> None:
    proxy: FaultProxy = fault_proxy_factory(registry.host)
    repo = registry.unique_repo("same")
    registry.push_image(image("v1"), repo=repo, tag="latest")
    ref = f"{proxy.host}/{repo}:latest"
    gallery = gallery_factory([{"name": "cpu-demo", "uri": ref, "alias": "demo", "version": "1.0.0"}])
    assert run_op(Backend.objects.lookup("cpu-demo"), JobKind.INSTALL).status == JobStatus.SUCCEEDED
    live = Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo"
    before = json.loads((live / "metadata.json").read_text())
    inode = live.stat().st_ino
    gallery_factory([{"name": "cpu-demo", "uri": ref, "alias": "demo", "version": "1.1.0"}])

    report = detection.find_upgrades(sync_galleries=False)

    [row] = report.rows
    assert row["upgrade_available"] is True
    assert row["reason"] == (
        "version 1.0.0 -> 1.1.0 (metadata only: no download: the tag still points at the installed image)"
    )
    proxy.log.clear()

    job = run_op(Backend.objects.lookup("cpu-demo"), JobKind.UPGRADE)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert "metadata only: no download" in job.message
    assert not [path for _, method, path, _ in proxy.log if "/blobs/" in path]  # no layer fetched
    assert live.stat().st_ino == inode and (live / "lib/version.txt").read_text() == "v1"
    raw = (live / "metadata.json").read_text()
    after = json.loads(raw)
    assert raw == (
        "{\n"
        '  "alias": "demo",\n'
        '  "name": "cpu-demo",\n'
        f'  "gallery_url": "{gallery.url}",\n'
        f'  "installed_at": "{after["installed_at"]}",\n'
        '  "version": "1.1.0",\n'
        f'  "uri": "{ref}",\n'
        f'  "digest": "{before["digest"]}"\n'
        "}"
    )
    backend = Backend.objects.get(name="cpu-demo")
    assert not backend.upgrade_available
    assert backend.installed.get(state="current").version == "1.1.0"
    [row] = detection.find_upgrades(sync_galleries=False).rows
    assert row["upgrade_available"] is False

    # A forced upgrade is a reinstall of the same build: the layers are fetched again.
    proxy.log.clear()
    forced = run_op(Backend.objects.lookup("cpu-demo"), JobKind.UPGRADE, force=True)
    assert forced.status == JobStatus.SUCCEEDED, forced.error
    assert "metadata only" not in forced.message
    assert [path for _, method, path, _ in proxy.log if "/blobs/" in path and method == "GET"]
    assert live.stat().st_ino != inode
