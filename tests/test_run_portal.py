"""Running the portal: the admin account `make run` makes, and `manage.py serve` starting and stopping the web
server and the worker together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from django.contrib.auth import get_user_model
from django.core.management import call_command

from tests.conftest import REPO
from tests.helpers.processes import free_port


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
