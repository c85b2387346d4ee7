"""A gallery URL's user, password and query token are used to fetch and shown nowhere: not in the
API, the admin, the commands' output, logs, sync errors, metadata.json or the installed-version
rows. The database that keeps them (with sessions and API tokens) is readable by its owner only.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from backends_app.disk import layout
from backends_app.models import Gallery, InstalledVersion, JobKind, JobStatus, Node
from backends_app.procedure import record_disk_state
from tests.conftest import REPO, run_op
from tests.helpers.api import client_for, make_user

USER, PASSWORD, TOKEN = "alice", "s3cret-pw-9911", "t0ken-8822"
SECRETS = (PASSWORD, TOKEN, f"{USER}:")
INDEX = "- name: cpu-whisper\n  uri: quay.io/example/backends:cpu-whisper\n"


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked in: {text[:300]}"


class PrivateGallery(BaseHTTPRequestHandler):
    """Serves INDEX only with Basic auth alice:<PASSWORD> and ?token=<TOKEN>; /broken answers 500."""

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        authorised = self.headers.get("Authorization") == expected
        self.server.seen.append((parts.path, authorised, parse_qs(parts.query).get("token")))  # type: ignore[attr-defined]
        if parts.path == "/broken":
            status, body = 500, f"internal error for {USER} with {TOKEN}".encode()
        elif not authorised or parse_qs(parts.query).get("token") != [TOKEN]:
            status, body = 401, b"who are you?"
        else:
            status, body = 200, INDEX.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def private_server() -> Iterator[Any]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), PrivateGallery)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://{USER}:{PASSWORD}@127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.django_db
def test_the_fetch_uses_the_credentials_that_nothing_shows(
    private_server: Any,
    admin_client: Any,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"{private_server.url}/index.yaml?token={TOKEN}"

    with caplog.at_level(logging.DEBUG):
        call_command("gallery", "add", "private", url, "--sync")
        call_command("gallery", "list")
    private = Gallery.objects.get(name="private")

    assert private_server.seen == [("/index.yaml", True, [TOKEN])]
    assert private.entry_count == 1 and private.has_credentials
    assert private.url == f"http://127.0.0.1:{private_server.server_address[1]}/index.yaml?token=***"
    out = capsys.readouterr()
    assert_no_secret(out.out + out.err + caplog.text)
    reader = client_for(make_user("reader"))
    listed = reader.get("/api/v1/galleries/")
    (shown,) = [row for row in listed.json()["results"] if row["name"] == "private"]
    assert listed.status_code == 200 and shown["has_credentials"] is True
    assert_no_secret(listed.content.decode())
    assert_no_secret(reader.get("/api/v1/galleries/private/").content.decode())
    assert_no_secret(admin_client.get("/admin/backends_app/gallery/").content.decode())
    assert_no_secret(admin_client.get(f"/admin/backends_app/gallery/{private.pk}/change/").content.decode())


@pytest.mark.django_db
def test_a_failed_sync_names_no_credential_in_its_error_or_the_log(
    private_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    source = Gallery.objects.create(name="broken", url=f"{private_server.url}/broken?token={TOKEN}")

    with caplog.at_level(logging.DEBUG):
        result = source.sync()
        answer = client_for(make_user("reader")).get("/api/v1/galleries/broken/")

    assert not result.ok and "HTTP 500" in result.error
    assert private_server.seen == [("/broken", True, [TOKEN])]
    assert_no_secret(result.error + result.summary() + caplog.text + answer.content.decode())


@pytest.mark.django_db
def test_the_api_keeps_credentials_it_is_given_apart(settings: Any) -> None:
    curator = client_for(make_user("curator", perms=("backends_app.add_gallery",)))
    url = f"https://{USER}:{PASSWORD}@galleries.example/index.yaml?token={TOKEN}&ref=main"

    created = curator.post("/api/v1/galleries/", {"name": "private", "url": url}, format="json")

    assert created.status_code == 201, created.json()
    assert created.json()["url"] == "https://galleries.example/index.yaml?token=***&ref=***"
    assert_no_secret(created.content.decode())
    stored = Gallery.objects.get(name="private")
    assert stored.url_with_credentials == url and stored.has_credentials


@pytest.mark.django_db
def test_the_admin_keeps_credentials_when_the_shown_url_comes_back_and_can_forget_them(
    admin_client: Any,
) -> None:
    source = Gallery.objects.create(name="private", url=f"https://{USER}:{PASSWORD}@galleries.example/i.yaml")
    change = f"/admin/backends_app/gallery/{source.pk}/change/"

    assert (
        admin_client.post(change, {"name": "private", "url": source.url, "enabled": "on"}).status_code == 302
    )
    assert Gallery.objects.get(pk=source.pk).has_credentials
    form = {"name": "private", "url": source.url, "enabled": "on", "forget_credentials": "on"}
    assert admin_client.post(change, form).status_code == 302
    assert not Gallery.objects.get(pk=source.pk).has_credentials


@pytest.mark.django_db
@pytest.mark.registry
def test_installed_backends_never_carry_the_credentials(published: Any, settings: Any) -> None:
    published.gallery.url = f"https://{USER}:{PASSWORD}@galleries.example/index.yaml?token={TOKEN}"
    published.gallery.save()

    job = run_op(published.backend, JobKind.INSTALL)

    assert job.status == JobStatus.SUCCEEDED, job.error
    metadata = json.loads((Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo" / "metadata.json").read_text())
    assert metadata["gallery_url"] == "https://galleries.example/index.yaml?token=***"
    row = InstalledVersion.objects.get(name="cpu-demo")
    assert row.gallery_url == metadata["gallery_url"] and row.backend == published.backend
    for root in (settings.PORTAL_BACKENDS_PATH, settings.PORTAL_STATE_PATH):
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert_no_secret(path.read_bytes().decode(errors="replace"))


@pytest.mark.django_db
def test_a_metadata_file_written_with_credentials_earlier_is_recorded_without_them(
    settings: Any, gallery_factory: Any
) -> None:
    gallery_factory([{"name": "cpu-old", "uri": "quay.io/x/old:1"}])
    live = Path(settings.PORTAL_BACKENDS_PATH) / "cpu-old"
    live.mkdir(parents=True)
    (live / "run.sh").write_text("#!/bin/sh\n")
    url = f"https://{USER}:{PASSWORD}@galleries.example/index.yaml?token={TOKEN}"
    layout.write_metadata(live, layout.BackendMetadata(name="cpu-old", gallery_url=url))

    record_disk_state(Node.local())

    assert InstalledVersion.objects.get(name="cpu-old").gallery_url == (
        "https://galleries.example/index.yaml?token=***"
    )


@pytest.mark.django_db(transaction=True)
def test_the_migration_moves_existing_credentials_out_of_the_url(settings: Any) -> None:
    settings.PORTAL_GALLERIES = "configured=https://galleries.example/configured.yaml"
    executor = MigrationExecutor(connection)
    latest = executor.loader.graph.leaf_nodes("backends_app")
    executor.migrate([("backends_app", "0001_initial")])
    old = MigrationExecutor(connection).loader.project_state([("backends_app", "0001_initial")]).apps
    OldGallery = old.get_model("backends_app", "Gallery")
    OldGallery.objects.all().delete()
    secret_url = f"https://{USER}:{PASSWORD}@galleries.example/index.yaml?token={TOKEN}"
    OldGallery.objects.create(name="private", url=secret_url)
    OldGallery.objects.create(name="configured", url="https://galleries.example/configured.yaml")

    MigrationExecutor(connection).migrate(latest)

    private = Gallery.objects.get(name="private")
    assert private.url == "https://galleries.example/index.yaml?token=***"
    assert private.url_with_credentials == secret_url
    assert private.set_through_web  # provenance unknown: confined until added again from the shell
    assert not Gallery.objects.get(name="configured").set_through_web


# --------------------------------------------------------------------------- files on disk


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def portal_env(data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PORTAL_", "DATABASE_URL"))}
    return {**env, "PORTAL_DATA_DIR": str(data_dir), "PORTAL_LOG_LEVEL": "WARNING"}


HOLD_OPEN = textwrap.dedent(
    """
    import json, os, stat, django
    django.setup()
    from django.db import connection
    from backends_app.models import Gallery
    Gallery.objects.create(name="g", url="https://u:p@galleries.example/i.yaml")
    name = connection.settings_dict["NAME"]
    modes = {s: oct(stat.S_IMODE(os.stat(f"{name}{s}").st_mode)) for s in ("", "-wal", "-shm")}
    print(json.dumps(modes))
    """
)


def test_a_fresh_data_directory_keeps_the_database_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = portal_env(data)

    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )

    assert migrate.returncode == 0, migrate.stderr
    assert mode(data) == 0o700
    assert mode(data / "portal.sqlite3") == 0o600
    assert mode(data / "secret_key") == 0o600
    # While a connection writes, SQLite's WAL and shared-memory files exist: same mode.
    child = subprocess.run(
        [sys.executable, "-c", HOLD_OPEN],
        cwd=REPO,
        env={**env, "DJANGO_SETTINGS_MODULE": "portal.settings"},
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == {"": "0o600", "-wal": "0o600", "-shm": "0o600"}


def test_an_existing_open_data_directory_is_narrowed_on_the_next_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    database = data / "portal.sqlite3"
    database.touch()
    database.chmod(0o644)

    check = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=REPO,
        env=portal_env(data),
        capture_output=True,
        text=True,
    )

    assert check.returncode == 0, check.stderr
    assert (mode(data), mode(database)) == (0o700, 0o600)
