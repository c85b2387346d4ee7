"""The gallery list on the backends page: names as LocalAI says them, installs that would replace
another gallery's backend, filters (capability, tag, kind, development builds), sort, paging over
LocalAI's real index at a fixed number of queries, and the galleries' own state (sync, errors)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_q.conf import Conf

from backends_app.models import Backend, Gallery, JobKind, UpgradeJob
from tests.conftest import LOCALAI_INDEX
from tests.test_admin_actions import install_row

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]


@pytest.fixture(autouse=True)
def only_test_galleries(db: Any) -> None:
    """The galleries migrate seeds (LocalAI's, on GitHub) are not these tests' business."""
    Gallery.objects.all().delete()


def gallery_names(response: Any) -> list[str]:
    return [row.display_name for row in response.context["gallery_rows"]]


def row_of(page: str, name: str, table: str) -> str:
    section = page.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
    match = re.search(rf'<tr [^>]*data-backend="{re.escape(name)}".*?</tr>', section, re.S)
    assert match, f"no row for {name} in #{table}"
    return match.group(0)


# --- two galleries, one name ----------------------------------------------------------------------


def test_a_name_two_galleries_offer_is_shown_as_gallery_at_name_and_replacing_is_said(
    admin_client: Any, gallery_factory: Any
) -> None:
    gallery_factory([{"name": "whisper", "uri": "127.0.0.1:9/a/whisper:latest"}], name="alpha")
    gallery_factory(
        [
            {"name": "whisper", "uri": "127.0.0.1:9/b/whisper:latest"},
            {"name": "piper", "uri": "127.0.0.1:9/b/piper:latest"},
        ],
        name="beta",
    )
    install_row(Backend.objects.get(gallery__name="alpha", name="whisper"), "v1")

    page = admin_client.get("/").content.decode()

    installed = row_of(page, "whisper", "installed")
    assert ">alpha@whisper</strong>" in installed
    offered = row_of(page, "whisper", "gallery")
    assert ">beta@whisper</strong>" in offered
    assert "Installing replaces alpha@whisper on test-node" in offered
    assert (
        'data-confirm="beta@whisper would replace alpha@whisper on test-node. Install it anyway?"' in offered
    )
    assert 'aria-label="Install beta@whisper, replacing alpha@whisper on test-node"' in offered
    piper = row_of(page, "piper", "gallery")  # one gallery offers it: its plain name, nothing replaced
    assert ">piper</strong>" in piper and "replac" not in piper
    # The API takes the same names.
    detail = admin_client.get("/api/v1/backends/beta@whisper/")
    assert detail.status_code == 200 and detail.json()["gallery"] == "beta"


# --- filters and sort -----------------------------------------------------------------------------

ENTRIES = [
    {
        "name": "whisper",
        "capabilities": {"default": "cpu-whisper", "nvidia": "cuda12-whisper"},
        "tags": ["ASR"],
    },
    {"name": "vllm", "capabilities": {"nvidia": "cuda12-vllm", "amd": "rocm-vllm"}, "tags": ["LLM"]},
    {"name": "cpu-whisper", "uri": "quay.io/x/b:latest-cpu-whisper", "tags": ["ASR", "CPU"]},
    {"name": "cuda12-whisper", "uri": "quay.io/x/b:latest-gpu-nvidia-cuda-12-whisper", "tags": ["asr"]},
    {"name": "cuda12-vllm", "uri": "quay.io/x/b:latest-gpu-nvidia-cuda-12-vllm", "tags": ["LLM"]},
    {"name": "rocm-vllm", "uri": "quay.io/x/b:latest-gpu-rocm-hipblas-vllm", "tags": ["LLM"]},
    {"name": "metal-whisper", "uri": "quay.io/x/b:latest-metal-darwin-arm64-whisper", "tags": ["ASR"]},
    {"name": "cpu-whisper-development", "uri": "quay.io/x/b:master-cpu-whisper", "tags": ["ASR"]},
]


@pytest.fixture
def catalogue(gallery_factory: Any) -> Gallery:
    return gallery_factory(ENTRIES, name="main")


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        # This node (capability "default"): CPU builds and the metas that have a build for it.
        ("", ["cpu-whisper", "whisper"]),
        ("?capability=nvidia", ["cpu-whisper", "cuda12-vllm", "cuda12-whisper", "vllm", "whisper"]),
        ("?capability=amd", ["cpu-whisper", "rocm-vllm", "vllm", "whisper"]),
        ("?capability=metal", ["cpu-whisper", "metal-whisper", "whisper"]),
        (
            "?capability=any",
            ["cpu-whisper", "cuda12-vllm", "cuda12-whisper", "metal-whisper", "rocm-vllm", "vllm", "whisper"],
        ),
        (
            "?capability=any&dev=1&tag=asr",
            ["cpu-whisper", "cpu-whisper-development", "cuda12-whisper", "metal-whisper", "whisper"],
        ),
        ("?capability=any&tag=LLM", ["cuda12-vllm", "rocm-vllm", "vllm"]),
        ("?capability=any&tag=CPU", ["cpu-whisper"]),
        ("?capability=any&kind=meta", ["vllm", "whisper"]),
        ("?capability=nvidia&kind=concrete&q=vllm", ["cuda12-vllm"]),
        (
            "?capability=any&sort=-name",
            ["whisper", "vllm", "rocm-vllm", "metal-whisper", "cuda12-whisper", "cuda12-vllm", "cpu-whisper"],
        ),
        ("?capability=bogus&kind=bogus&sort=bogus", ["cpu-whisper", "whisper"]),  # unknown: the defaults
    ],
)
def test_the_gallery_list_filters_and_sorts(
    admin_client: Any, catalogue: Gallery, query: str, shown: list[str]
) -> None:
    response = admin_client.get(f"/{query}")
    names = gallery_names(response)
    assert names == (shown if "sort=-name" in query else sorted(shown)), query
    assert response.context["page"].paginator.count == len(shown)


def test_filters_are_offered_and_a_narrowed_list_can_be_cleared(
    admin_client: Any, catalogue: Gallery
) -> None:
    page = admin_client.get("/?tag=asr&capability=nvidia").content.decode()
    tags = re.findall(
        r'<option value="([^"]*)"', page.split('id="filter-tag"', 1)[1].split("</select>", 1)[0]
    )
    assert tags == ["", "ASR", "CPU", "LLM"]  # once each, ignoring case
    assert '<option value="nvidia" selected>' in page
    assert 'id="clear-filters"' in page
    assert "development builds hidden" in page
    assert 'id="clear-filters"' not in admin_client.get("/").content.decode()


# --- LocalAI's real index -------------------------------------------------------------------------


def test_localais_real_index_is_filtered_and_paged_at_a_fixed_number_of_queries(
    admin_client: Any, tmp_path: Path
) -> None:
    gallery = Gallery.objects.create(name="localai", url=LOCALAI_INDEX.as_uri())
    assert gallery.sync().ok
    assert Backend.objects.filter(gallery=gallery).count() > 1000
    queries = {}
    for query in (
        "",
        "?capability=any&dev=1",
        "?capability=nvidia-cuda-12&tag=LLM&page=2",
        "?q=whisper&sort=gallery",
    ):
        admin_client.get(f"/{query}")  # warm: sessions, content types
        with CaptureQueriesContext(connection) as counted:
            response = admin_client.get(f"/{query}")
        assert response.status_code == 200
        assert len(response.context["gallery_rows"]) <= 25
        queries[query] = (len(counted), response.context["page"].paginator.count)
    counts = {count for count, _ in queries.values()}
    assert len(counts) == 1 and counts.pop() <= 15, queries
    # Everything, development builds included: the whole index but its later duplicates.
    visible = Backend.objects.filter(gallery=gallery, occurrence=0, gone=False).count()
    assert queries["?capability=any&dev=1"][1] == visible
    default = admin_client.get("/?sort=name")
    names = {row.backend.name for row in default.context["gallery_rows"]}
    assert default.context["page"].paginator.count < visible / 2
    assert not any(name.endswith("-development") for name in names)
    every = []
    for number in range(1, default.context["page"].paginator.num_pages + 1):
        every += gallery_names(admin_client.get(f"/?page={number}"))
    assert "cpu-llama-cpp" in every and "llama-cpp" in every  # a CPU build, and the meta
    assert not {"cuda12-llama-cpp", "metal-llama-cpp", "cpu-llama-cpp-development"} & set(every)
    cuda = []
    for number in range(1, 10):
        response = admin_client.get(f"/?capability=nvidia-cuda-12&q=llama-cpp&page={number}")
        cuda += gallery_names(response)
        if not response.context["page"].has_next():
            break
    assert "cuda12-llama-cpp" in cuda and "metal-llama-cpp" not in cuda


# --- the galleries' own state ---------------------------------------------------------------------


def test_a_gallery_that_cannot_be_reached_shows_its_error_on_the_page(
    admin_client: Any, tmp_path: Path
) -> None:
    gallery = Gallery.objects.create(name="offline", url=(tmp_path / "missing.yaml").as_uri())
    assert not gallery.sync().ok

    page = admin_client.get("/").content.decode()

    alert = re.search(
        r'<p class="alert error gallery-error"[^>]*data-gallery="offline">(.*?)</p>', page, re.S
    )
    assert alert, "no error shown for the gallery"
    assert "Gallery offline could not be synced" in alert.group(1) and "missing.yaml" in alert.group(1)
    assert "The galleries could not be synced: see above." in page


def test_sync_galleries_button_syncs_them_on_the_workers(
    admin_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    monkeypatch.setattr(Conf, "SYNC", True)  # the worker runs it inline
    index = tmp_path / "index.yaml"
    index.write_text("- name: piper\n  uri: quay.io/x/piper:latest\n")
    Gallery.objects.create(name="mine", url=index.as_uri())
    assert "piper" not in admin_client.get("/").content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post("/galleries/sync/", {"next": "/?q=pip"}, follow=True)

    assert response.redirect_chain[-1][0] == "/?q=pip"
    assert "Syncing mine" in response.content.decode()
    assert gallery_names(admin_client.get("/")) == ["piper"]
    gallery = Gallery.objects.get(name="mine")
    assert gallery.last_synced_at is not None and not gallery.sync_pending


def test_the_sync_button_needs_the_gallery_permission(client: Any, tmp_path: Path) -> None:
    Gallery.objects.create(name="mine", url=(tmp_path / "index.yaml").as_uri())
    client.force_login(get_user_model().objects.create_user("member", password="pw"))
    assert 'id="sync-galleries"' not in client.get("/").content.decode()
    assert client.post("/galleries/sync/").status_code == 403
    assert Gallery.objects.get(name="mine").sync_requested_at is None


def test_a_worker_starting_syncs_the_galleries_never_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    monkeypatch.setattr(Conf, "SYNC", True)
    index = tmp_path / "index.yaml"
    index.write_text("- name: piper\n  uri: quay.io/x/piper:latest\n")
    fresh = Gallery.objects.create(name="fresh", url=index.as_uri())
    synced = Gallery.objects.create(name="synced", url=(tmp_path / "other.yaml").as_uri())
    Gallery.objects.filter(pk=synced.pk).update(last_synced_at="2020-01-01T00:00:00Z")
    Gallery.objects.create(name="off", url=(tmp_path / "off.yaml").as_uri(), enabled=False)

    out = io.StringIO()
    with django_capture_on_commit_callbacks(execute=True):
        call_command("worker", "--once", stdout=out)

    assert "first sync of gallery fresh queued" in out.getvalue()
    fresh.refresh_from_db()
    assert fresh.last_synced_at is not None and Backend.objects.filter(gallery=fresh, name="piper").exists()
    assert Gallery.objects.get(name="off").last_attempt_at is None
    assert Gallery.objects.get(name="synced").last_attempt_at is None  # synced before: left alone


def test_a_fresh_page_says_the_galleries_are_syncing(admin_client: Any, tmp_path: Path) -> None:
    Gallery.objects.create(name="fresh", url=(tmp_path / "index.yaml").as_uri())
    Gallery.objects.all().request_sync()  # queued; no worker here runs it
    page = admin_client.get("/").content.decode()
    assert 'id="syncing"' in page and "The galleries are being synced." in page
    assert admin_client.get("/live/backends/").json()["galleries"][0]["pending"] is True
    assert not UpgradeJob.objects.filter(kind=JobKind.CHECK).exists()
