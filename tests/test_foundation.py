"""The runnable portal: configuration checks, the admin account, the one-command server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from django.contrib.auth import get_user_model
from django.core.checks import run_checks
from django.core.management import call_command

from backends_app.models import Gallery, Node, PortalSettings
from backends_app.system_checks import configured_galleries
from tests.conftest import REPO


def error_messages() -> list[str]:
    return [str(problem.msg) for problem in run_checks() if problem.id and problem.id.startswith("portal.")]


def test_default_configuration_passes_the_system_checks() -> None:
    assert error_messages() == []


def test_a_state_path_inside_the_backends_directory_is_refused(settings, tmp_path: Path) -> None:
    settings.PORTAL_STATE_PATH = settings.PORTAL_BACKENDS_PATH / ".state"
    assert any("LocalAI would list it" in msg for msg in error_messages())


def test_a_backends_path_that_is_a_file_is_refused(settings, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    settings.PORTAL_BACKENDS_PATH = tmp_path / "afile"
    assert any("not a directory" in msg for msg in error_messages())


def test_malformed_settings_are_reported_by_name(settings) -> None:
    settings.PORTAL_GALLERIES = "just-a-url-without-name"
    settings.PORTAL_PLATFORM = "amd64"
    settings.INVALID_SETTINGS = ["PORTAL_WORKERS='two' is not a whole number"]
    messages = " | ".join(error_messages())
    assert "PORTAL_GALLERIES" in messages
    assert "PORTAL_PLATFORM" in messages
    assert "PORTAL_WORKERS" in messages


def test_a_malformed_environment_variable_is_a_check_error_not_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PORTAL_DATA_DIR": str(tmp_path), "PORTAL_WORKERS": "two", "DATABASE_URL": ""}
    done = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "PORTAL_WORKERS='two' is not a whole number" in done.stderr
    assert "Traceback" not in done.stderr


def test_galleries_setting_accepts_localais_json_and_name_url_pairs() -> None:
    assert configured_galleries('[{"name": "a", "url": "file:///a.yaml"}]') == [("a", "file:///a.yaml")]
    assert configured_galleries("a=file:///a.yaml, b=github:o/r/i.yaml@main") == [
        ("a", "file:///a.yaml"),
        ("b", "github:o/r/i.yaml@main"),
    ]
    with pytest.raises(ValueError, match="name and a url"):
        configured_galleries('[{"url": "file:///a.yaml"}]')


@pytest.mark.django_db
def test_migrate_seeds_the_default_gallery_and_settings() -> None:
    assert Gallery.objects.get(name="localai").url == "github:mudler/LocalAI/backend/index.yaml@master"
    row = PortalSettings.load()
    assert row.check_interval_minutes == 360 and row.versions_kept == 1


@pytest.mark.django_db
def test_localais_environment_value_locks_auto_upgrade_on_while_it_is_set(settings) -> None:
    PortalSettings.objects.all().delete()
    settings.PORTAL_SETTINGS_FROM_ENVIRONMENT = {
        "auto_upgrade_backends": ("LOCALAI_AUTO_UPGRADE_BACKENDS", "true", True)
    }
    row = PortalSettings.load()
    assert row.auto_upgrade_backends is False and row.auto_upgrade_enabled is True
    settings.PORTAL_SETTINGS_FROM_ENVIRONMENT = {}
    assert PortalSettings.load().auto_upgrade_enabled is False  # unset: the stored value counts again


@pytest.mark.django_db
def test_the_local_node_follows_the_settings(settings) -> None:
    node = Node.local()
    assert node.is_local and node.capability == "default"
    assert node.backends_path == str(settings.PORTAL_BACKENDS_PATH)
    settings.PORTAL_CAPABILITY = "nvidia"
    assert Node.local().capability == "nvidia"
    assert Node.objects.count() == 1


@pytest.mark.django_db
def test_maintenance_window_may_cross_midnight() -> None:
    import datetime as dt

    from django.utils import timezone

    row = PortalSettings.load()
    row.maintenance_window_start, row.maintenance_window_end = dt.time(22), dt.time(4)
    at = lambda hour: timezone.make_aware(dt.datetime(2026, 1, 1, hour, 30))  # noqa: E731
    assert row.in_maintenance_window(at(23)) and row.in_maintenance_window(at(3))
    assert not row.in_maintenance_window(at(12))


@pytest.mark.django_db
def test_ensure_admin_creates_one_superuser_with_a_generated_password(capsys, monkeypatch) -> None:
    monkeypatch.delenv("PORTAL_ADMIN_PASSWORD", raising=False)
    call_command("ensure_admin")
    out = capsys.readouterr().out
    password = out.split("password: ")[1].split()[0]
    user = get_user_model().objects.get(username="admin")
    assert user.is_superuser and user.check_password(password)
    call_command("ensure_admin")
    assert "exists" in capsys.readouterr().out
    assert get_user_model().objects.count() == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment mentions `marker` (this test's data folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_serve_starts_web_server_and_worker_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PORTAL_DATA_DIR": str(tmp_path), "DATABASE_URL": "", "PORT": str(port)}
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput"], cwd=REPO, env=env, check=True, capture_output=True)
    server = subprocess.Popen(
        [*manage, "serve"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(server.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        # Generous: a server starting on a loaded machine may take many seconds to answer.
        deadline = time.monotonic() + 120
        page = None
        while time.monotonic() < deadline and page is None:
            try:
                page = requests.get(f"http://127.0.0.1:{port}/admin/login/", timeout=30)
            except requests.RequestException:
                time.sleep(0.2)
        assert page is not None and page.status_code == 200
        assert 'name="username"' in page.text
        assert (
            requests.get(f"http://127.0.0.1:{port}/static/admin/css/base.css", timeout=30).status_code == 200
        )
        while time.monotonic() < deadline and not any("running" in line.lower() for line in output):
            time.sleep(0.2)
        assert any("reconcile" in line or "recovered" in line for line in output), output
        assert any("Q Cluster" in line and "running" in line for line in output), output
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
    reader.join(timeout=30)
    assert server.returncode == 0, "".join(output)
    deadline = time.monotonic() + 60
    while processes_with(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(str(tmp_path)) == []
