"""Gallery sync: LocalAI's real index stored whole, unchanged on a second sync, nothing lost on failure."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from backends_app.models import Backend, Gallery
from tests.conftest import LOCALAI_INDEX

pytestmark = pytest.mark.django_db


@pytest.fixture
def index_file(tmp_path: Path) -> Path:
    path = tmp_path / "index.yaml"
    shutil.copyfile(LOCALAI_INDEX, path)
    return path


@pytest.fixture
def localai(index_file: Path) -> Gallery:
    return Gallery.objects.create(name="real", url=index_file.as_uri())


def snapshot(gallery: Gallery) -> list[tuple]:
    return list(
        Backend.objects.filter(gallery=gallery)
        .order_by("pk")
        .values_list(
            "pk", "name", "occurrence", "uri", "mirrors", "capabilities", "resolves_to", "updated_at"
        )
    )


def test_syncing_localais_real_index_stores_every_entry(localai: Gallery) -> None:
    result = localai.sync()

    assert result.ok, result.error
    rows = Backend.objects.filter(gallery=localai)
    assert rows.count() == 1033
    assert rows.values("name").distinct().count() == 1028
    assert rows.filter(is_meta=True).count() == 140
    assert rows.filter(is_meta=False).count() == 893
    assert sorted(set(result.duplicates)) == [
        "intel-rfdetr",
        "metal-crispasr",
        "metal-crispasr-development",
        "metal-whisper",
        "metal-whisper-development",
    ]
    localai.refresh_from_db()
    assert localai.entry_count == 1033 and localai.last_error == "" and localai.last_synced_at


def test_concrete_entries_inherit_merged_fields_and_mirrors(localai: Gallery) -> None:
    localai.sync()

    cpu = Backend.objects.lookup("cpu-llama-cpp")
    assert not cpu.is_meta
    assert cpu.uri.startswith("quay.io/go-skynet/local-ai-backends:")
    assert cpu.mirrors and cpu.mirrors[0].startswith("localai/localai-backends:")
    assert cpu.alias == "llama-cpp"
    assert "LLM" in cpu.tags
    assert cpu.reference_chain == [cpu.uri, *cpu.mirrors]
    dev = Backend.objects.lookup("cpu-llama-cpp-development")
    assert dev.is_development and ":master-" in dev.uri


def test_meta_entries_resolve_for_the_local_capability(localai: Gallery, settings) -> None:
    localai.sync()
    meta = Backend.objects.lookup("llama-cpp")
    assert meta.is_meta and meta.uri == ""
    assert meta.resolves_to is not None and meta.resolves_to.name == "cpu-llama-cpp"

    settings.PORTAL_CAPABILITY = "nvidia"
    localai.sync(force=True)
    meta.refresh_from_db()
    assert meta.resolves_to.name == "cuda12-llama-cpp"

    settings.PORTAL_CAPABILITY = "a-capability-nobody-has"
    localai.sync(force=True)
    meta.refresh_from_db()
    assert meta.resolves_to.name == "cpu-llama-cpp"


def test_first_occurrence_of_a_duplicated_name_wins_the_lookup(localai: Gallery) -> None:
    localai.sync()

    found = Backend.objects.lookup("metal-whisper")
    assert found.occurrence == 0
    assert Backend.objects.filter(name="metal-whisper").count() == 2
    assert found.position < Backend.objects.get(name="metal-whisper", occurrence=1).position


def test_syncing_twice_changes_nothing(localai: Gallery) -> None:
    localai.sync()
    before = snapshot(localai)

    unchanged = localai.sync()
    assert unchanged.ok and unchanged.not_modified
    forced = localai.sync(force=True)
    assert forced.ok and (forced.created, forced.updated, forced.gone) == (0, 0, 0)
    assert snapshot(localai) == before


def test_a_broken_index_keeps_the_earlier_sync_and_shows_the_error(
    localai: Gallery, index_file: Path, admin_client
) -> None:
    localai.sync()
    before = snapshot(localai)

    index_file.write_text("- name: fine\n  uri: quay.io/a/b:c\n- name: [unclosed\n")
    result = localai.sync()

    assert not result.ok
    assert snapshot(localai) == before
    localai.refresh_from_db()
    assert localai.last_error and localai.entry_count == 1033
    page = admin_client.get("/admin/backends_app/gallery/")
    assert page.status_code == 200
    assert localai.last_error[:40] in page.content.decode()


def test_an_index_of_the_wrong_shape_changes_nothing(localai: Gallery, index_file: Path) -> None:
    localai.sync()
    before = snapshot(localai)

    index_file.write_text("backends:\n  - name: x\n")
    assert not localai.sync().ok
    index_file.write_text("- name: no-uri-no-capabilities\n")
    assert not localai.sync().ok
    assert snapshot(localai) == before


def test_an_unreachable_gallery_records_a_clear_error(db) -> None:
    gallery = Gallery.objects.create(name="gone", url="file:///nonexistent/index.yaml")
    result = gallery.sync()
    assert not result.ok
    gallery.refresh_from_db()
    assert "nonexistent" in gallery.last_error


def test_an_entry_that_vanished_is_marked_gone_not_deleted(localai: Gallery, index_file: Path) -> None:
    index_file.write_text(
        "- name: alpha\n  uri: quay.io/x/alpha:latest\n- name: beta\n  uri: quay.io/x/beta:latest\n"
    )
    localai.sync()
    index_file.write_text("- name: alpha\n  uri: quay.io/x/alpha:latest\n")

    result = localai.sync()

    assert result.gone == 1
    beta = Backend.objects.get(name="beta")
    assert beta.gone
    assert not Backend.objects.get(name="alpha").gone
    index_file.write_text(
        "- name: alpha\n  uri: quay.io/x/alpha:latest\n- name: beta\n  uri: quay.io/x/beta:v2\n"
    )
    localai.sync()
    beta.refresh_from_db()
    assert not beta.gone and beta.uri == "quay.io/x/beta:v2"


def test_gallery_commands_add_sync_and_list(index_file: Path, capsys) -> None:
    call_command("gallery", "add", "mine", index_file.as_uri(), "--sync")
    out = capsys.readouterr().out
    assert "1033 entries" in out
    assert Backend.objects.filter(gallery__name="mine").count() == 1033

    call_command("gallery", "list")
    assert "mine" in capsys.readouterr().out

    index_file.write_text("not: [valid")
    with pytest.raises(CommandError, match="failed"):
        call_command("gallery", "sync", "mine")
    with pytest.raises(CommandError, match="no gallery named"):
        call_command("gallery", "sync", "nope")
    with pytest.raises(CommandError):
        call_command("gallery", "add", "bad", "ftp://example.invalid/index.yaml")


def test_lookup_by_gallery_and_name_when_two_galleries_share_a_name(tmp_path: Path) -> None:
    for name in ("one", "two"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"- name: shared\n  uri: quay.io/{name}/shared:latest\n")
        Gallery.objects.create(name=name, url=path.as_uri()).sync()

    with pytest.raises(Backend.MultipleObjectsReturned, match="one@shared"):
        Backend.objects.lookup("shared")
    assert Backend.objects.lookup("two@shared").uri == "quay.io/two/shared:latest"
    with pytest.raises(Backend.DoesNotExist):
        Backend.objects.lookup("three@shared")


def test_sync_task_syncs_every_enabled_gallery(localai: Gallery) -> None:
    from backends_app.tasks import sync_galleries

    Gallery.objects.exclude(pk=localai.pk).update(enabled=False)
    Gallery.objects.create(name="off", url="file:///nonexistent.yaml", enabled=False)
    lines = sync_galleries()
    assert len(lines) == 1 and "1033 entries" in lines[0]
