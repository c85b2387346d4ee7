"""A gallery URL set through the web (API, admin) cannot be used to look around the server.

file:// must stay under PORTAL_GALLERY_FILE_ROOTS, symlinks included; no fetch reaches a loopback,
link-local or own address, however the host is spelled; failures say nothing about the file or the
document. The command line and PORTAL_GALLERIES keep their freedom, and their detailed messages.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from backends_app.models import Backend, Gallery
from backends_app.signals import seed_defaults
from tests.helpers.api import client_for, make_user

pytestmark = pytest.mark.django_db

INDEX = "- name: cpu-whisper\n  uri: quay.io/example/backends:cpu-whisper\n"
SECRET_TEXT = "internal-service-secret-4711"


@pytest.fixture
def roots(tmp_path: Path, settings: Any) -> Path:
    """The one directory web-set galleries may read from; a sibling directory is outside it."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "outside").mkdir()
    settings.PORTAL_GALLERY_FILE_ROOTS = [allowed]
    return allowed


@pytest.fixture
def api() -> Any:
    return client_for(make_user("curator", perms=("backends_app.add_gallery", "backends_app.change_gallery")))


class Recorder(BaseHTTPRequestHandler):
    """Answers every GET (also a proxy's absolute-URI GET) with a body that is not a gallery."""

    requests: list[str]

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        body = f"backends:\n  token: {SECRET_TEXT}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[Any]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- file://


@pytest.mark.parametrize("target", ["/etc/passwd", "/etc/no-such-file", "/etc", "outside/index.yaml"])
def test_a_file_outside_the_allowed_directories_is_refused_alike_whether_it_exists(
    api: Any, roots: Path, target: str
) -> None:
    path = target if target.startswith("/") else str(roots.parent / target)
    (roots.parent / "outside" / "index.yaml").write_text(INDEX)

    response = api.post("/api/v1/galleries/", {"name": "probe", "url": f"file://{path}"}, format="json")

    assert response.status_code == 400
    (message,) = response.json()["url"]
    assert (
        message == f"gallery URL 'file://{path}': file:// galleries set through the web must be under {roots}"
    )
    assert not Gallery.objects.filter(name="probe").exists()


def test_a_file_under_the_allowed_directories_is_accepted_and_syncs(api: Any, roots: Path) -> None:
    (roots / "index.yaml").write_text(INDEX)

    response = api.post(
        "/api/v1/galleries/", {"name": "local", "url": (roots / "index.yaml").as_uri()}, format="json"
    )
    assert response.status_code == 201, response.json()
    synced = api.post("/api/v1/galleries/local/sync/")

    assert synced.status_code == 200 and synced.json()["created"] == 1
    assert Gallery.objects.get(name="local").set_through_web


def test_a_symlink_leading_out_of_the_allowed_directories_is_refused(api: Any, roots: Path) -> None:
    outside = roots.parent / "outside" / "index.yaml"
    outside.write_text(INDEX)
    (roots / "link.yaml").symlink_to(outside)
    (roots / "dir").symlink_to(outside.parent)

    for url in [(roots / "link.yaml").as_uri(), (roots / "dir" / "index.yaml").as_uri()]:
        response = api.post("/api/v1/galleries/", {"name": "probe", "url": url}, format="json")
        assert response.status_code == 400
        assert "must be under" in response.json()["url"][0]


def test_a_path_outside_is_refused_even_when_it_links_into_the_allowed_directories(
    api: Any, roots: Path
) -> None:
    """The answer for a path elsewhere never depends on what is there."""
    (roots / "index.yaml").write_text(INDEX)
    (roots.parent / "outside" / "in.yaml").symlink_to(roots / "index.yaml")

    response = api.post(
        "/api/v1/galleries/",
        {"name": "probe", "url": (roots.parent / "outside" / "in.yaml").as_uri()},
        format="json",
    )

    assert response.status_code == 400 and "must be under" in response.json()["url"][0]


def test_a_file_swapped_for_a_symlink_after_it_was_set_is_not_read(api: Any, roots: Path) -> None:
    index = roots / "index.yaml"
    index.write_text(INDEX)
    assert (
        api.post("/api/v1/galleries/", {"name": "local", "url": index.as_uri()}, format="json").status_code
        == 201
    )
    outside = roots.parent / "outside" / "index.yaml"
    outside.write_text(INDEX.replace("cpu-whisper", "smuggled"))
    index.unlink()
    index.symlink_to(outside)

    response = api.post("/api/v1/galleries/local/sync/")

    assert response.status_code == 502
    assert not Backend.objects.filter(name="smuggled").exists()


def test_failures_of_a_web_set_file_gallery_say_nothing_about_the_file(
    api: Any, roots: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = roots / "index.yaml"
    assert (
        api.post("/api/v1/galleries/", {"name": "local", "url": index.as_uri()}, format="json").status_code
        == 201
    )
    cases = {
        "missing": lambda: None,
        "directory": lambda: index.mkdir(),
        "mapping": lambda: index.write_text(f"token: {SECRET_TEXT}\n"),
        "scalar": lambda: index.write_text(f"{SECRET_TEXT}\n"),
        "bad yaml": lambda: index.write_text(f"- [{SECRET_TEXT}\n"),
        "binary": lambda: index.write_bytes(b"\xff\xfe\xfa" + SECRET_TEXT.encode()),
    }
    errors = {}
    for case, make in cases.items():
        if index.is_dir():
            index.rmdir()
        index.unlink(missing_ok=True)
        make()
        with caplog.at_level(logging.WARNING, logger="backends_app.models"):
            body = api.post("/api/v1/galleries/local/sync/").json()
        errors[case] = (body["error"], api.get("/api/v1/galleries/local/").json()["last_error"])

    assert len(set(errors.values())) == 1, errors
    (shown, stored) = next(iter(errors.values()))
    assert shown == stored and SECRET_TEXT not in shown
    assert "does not exist" not in shown and "mapping" not in shown
    # The operator finds the details in the server log.
    assert "does not exist" in caplog.text and "a mapping" in caplog.text


def test_the_admin_refuses_a_file_outside_the_allowed_directories(admin_client: Any, roots: Path) -> None:
    add = "/admin/backends_app/gallery/add/"
    page = admin_client.post(add, {"name": "probe", "url": "file:///etc/passwd", "enabled": "on"})

    assert page.status_code == 200 and "must be under" in page.content.decode()
    assert not Gallery.objects.filter(name="probe").exists()

    (roots / "index.yaml").write_text(INDEX)
    page = admin_client.post(add, {"name": "local", "url": (roots / "index.yaml").as_uri(), "enabled": "on"})
    assert page.status_code == 302
    assert Gallery.objects.get(name="local").set_through_web


def test_the_command_line_and_the_environment_may_name_any_file_and_get_details(
    roots: Path, settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = roots.parent / "outside" / "index.yaml"
    outside.write_text(INDEX)

    call_command("gallery", "add", "cli", outside.as_uri(), "--sync")
    settings.PORTAL_GALLERIES = f"env={outside.as_uri()}"
    seed_defaults()

    for name in ("cli", "env"):
        source = Gallery.objects.get(name=name)
        assert not source.set_through_web
        assert source.sync(force=True).ok
    outside.unlink()
    assert "does not exist" in Gallery.objects.get(name="cli").sync(force=True).error


def test_a_gallery_editor_cannot_make_a_command_line_gallery_unconfined_by_editing_it(
    admin_client: Any, roots: Path
) -> None:
    outside = roots.parent / "outside" / "index.yaml"
    outside.write_text(INDEX)
    call_command("gallery", "add", "cli", outside.as_uri())
    cli = Gallery.objects.get(name="cli")
    change = f"/admin/backends_app/gallery/{cli.pk}/change/"

    # Leaving the URL alone keeps it as the command line set it.
    assert admin_client.post(change, {"name": "cli", "url": cli.url}).status_code == 302
    assert not Gallery.objects.get(name="cli").set_through_web
    # Pointing it elsewhere outside the roots is refused like any web-set URL.
    page = admin_client.post(change, {"name": "cli", "url": "file:///etc/passwd", "enabled": "on"})
    assert "must be under" in page.content.decode()
    assert Gallery.objects.get(name="cli").url == outside.as_uri()


# --------------------------------------------------------------------------- http(s)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "LOCALHOST.",
        "foo.localhost",
        "[::1]",
        "0.0.0.0",
        "169.254.169.254",
        "[::ffff:127.0.0.1]",
    ],
)
def test_the_api_refuses_a_gallery_on_this_machine_or_its_link(api: Any, host: str) -> None:
    response = api.post(
        "/api/v1/galleries/", {"name": "probe", "url": f"http://{host}:8080/index.yaml"}, format="json"
    )

    assert response.status_code == 400
    assert "reaches this machine or its local link" in response.json()["url"][0]
    assert not Gallery.objects.filter(name="probe").exists()


@pytest.mark.parametrize("spelling", ["127.1", "2130706433", "0x7f000001", "127.0.0.1"])
def test_a_web_set_gallery_never_connects_to_this_machine_however_it_is_spelled(
    local_server: Any, spelling: str
) -> None:
    port = local_server.server_address[1]
    # As if set through the web before this rule, or through a name that resolves here.
    source = Gallery.objects.create(
        name="probe", url=f"http://{spelling}:{port}/index.yaml", set_through_web=True
    )

    result = source.sync()

    assert not result.ok and "this machine or its local link" in result.error
    assert local_server.requests == []
    assert SECRET_TEXT not in result.error


def test_the_same_url_from_the_command_line_is_fetched(local_server: Any) -> None:
    port = local_server.server_address[1]
    call_command("gallery", "add", "cli", f"http://127.1:{port}/index.yaml")

    result = Gallery.objects.get(name="cli").sync()

    assert local_server.requests == ["/index.yaml"]
    assert not result.ok and "the top level is a mapping" in result.error  # details for the shell


def test_a_web_set_http_gallery_never_echoes_the_document(
    local_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a proxy (the proxy connects, so the host is not this machine's), the body of an
    internal service that is not a gallery does not come back in the error."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{local_server.server_address[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    source = Gallery.objects.create(name="probe", url="http://intranet.example/api", set_through_web=True)

    with caplog.at_level(logging.WARNING, logger="backends_app.models"):
        result = source.sync()

    assert local_server.requests == ["http://intranet.example/api"]
    assert not result.ok and SECRET_TEXT not in result.error
    assert "not a valid gallery index" in result.error
    assert "the top level is a mapping" in caplog.text
