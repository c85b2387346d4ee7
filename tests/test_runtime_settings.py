"""LocalAI's runtime_settings.json, shared: read at start, watched, written from the admin, the pages
and the API in LocalAI's format, and the environment's lock on auto-upgrade shown and enforced."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model

from backends_app import runtime_settings
from backends_app.models import PortalSettings
from portal import settings as portal_settings
from tests.conftest import REPO, subprocess_env
from tests.helpers.api import client_for, make_user

# What LocalAI (json.MarshalIndent, struct order) writes after its settings page saved these, plus a
# key only a newer LocalAI knows: the portal must keep every byte of it but the value it changes.
LOCALAI_WRITTEN = """{
  "watchdog_enabled": true,
  "watchdog_idle_timeout": "15m",
  "auto_upgrade_backends": false,
  "memory_reclaimer_threshold": 0.9,
  "cors_allow_origins": "https://a.example\\u0026b",
  "galleries": [
    {
      "url": "http://example/g1",
      "name": "g1"
    }
  ],
  "api_keys": [
    "k1"
  ],
  "mitm_listen": "127.0.0.1:0",
  "pii_default_detectors": null,
  "a_newer_localai_setting": {
    "x": 1
  }
}"""
LOCKED = {"auto_upgrade_backends": ("LOCALAI_AUTO_UPGRADE_BACKENDS", "true", True)}
PAGE_FORM = {"check_interval_minutes": "360", "versions_kept": "1"}


def settings_file(settings: Any) -> Path:
    return Path(settings.PORTAL_BACKENDS_PATH).parent / "configuration" / "runtime_settings.json"


@pytest.fixture
def localai_file(settings: Any) -> Path:
    """runtime_settings.json as LocalAI left it, where LocalAI keeps it beside its backends."""
    path = settings_file(settings)
    path.parent.mkdir(mode=0o700, parents=True)
    path.write_text(LOCALAI_WRITTEN)
    path.chmod(0o644)
    return path


def written_by_localai_with(**changes: str) -> str:
    text = LOCALAI_WRITTEN
    for old, new in changes.items():
        text = text.replace(old, new)
    return text


# --- the format ----------------------------------------------------------------------------------


def test_the_file_is_written_byte_for_byte_as_localai_writes_it() -> None:
    values = json.loads(LOCALAI_WRITTEN)

    assert runtime_settings.dumps(values).decode() == LOCALAI_WRITTEN
    # Keys come out in LocalAI's struct order whatever order they were given in; the two fields
    # without omitempty are always there.
    shuffled = {"mitm_listen": "x", "debug": True, "auto_upgrade_backends": True}
    assert runtime_settings.dumps(shuffled).decode() == (
        '{\n  "auto_upgrade_backends": true,\n  "debug": true,\n  "api_keys": null,\n'
        '  "mitm_listen": "x",\n  "pii_default_detectors": null\n}'
    )


# --- written from the pages, the admin and the API -------------------------------------------------


@pytest.mark.django_db
def test_a_change_in_the_settings_page_writes_the_file_in_localais_format_keeping_its_keys(
    admin_client: Any, localai_file: Path
) -> None:
    response = admin_client.post("/settings/", {**PAGE_FORM, "auto_upgrade_backends": "on"}, follow=True)

    assert "Settings saved." in response.content.decode()
    assert PortalSettings.load().auto_upgrade_backends is True
    assert localai_file.read_text() == written_by_localai_with(
        **{'"auto_upgrade_backends": false': '"auto_upgrade_backends": true'}
    )
    assert stat.S_IMODE(localai_file.stat().st_mode) == 0o600
    assert [p.name for p in localai_file.parent.iterdir()] == ["runtime_settings.json"]  # no temp left


@pytest.mark.django_db
def test_a_change_in_the_admin_writes_the_file(admin_client: Any, localai_file: Path) -> None:
    row = PortalSettings.load()
    url = f"/admin/backends_app/portalsettings/{row.pk}/change/"
    form = {**PAGE_FORM, "health_check_timeout": "30", "auto_upgrade_backends": "on"}

    response = admin_client.post(url, form)

    assert response.status_code == 302, response.content.decode()[:2000]
    assert '"auto_upgrade_backends": true' in localai_file.read_text()
    assert '"mitm_listen": "127.0.0.1:0"' in localai_file.read_text()


@pytest.mark.django_db
def test_a_change_through_the_portals_api_writes_the_file(localai_file: Path) -> None:
    api = client_for(make_user("ops", perms=("backends_app.change_portalsettings",)))

    assert api.patch("/api/v1/settings/", {"auto_upgrade_backends": True}, format="json").status_code == 200

    assert localai_file.read_text() == written_by_localai_with(
        **{'"auto_upgrade_backends": false': '"auto_upgrade_backends": true'}
    )


@pytest.mark.django_db
def test_saving_settings_localai_does_not_have_leaves_the_file_alone(
    admin_client: Any, settings: Any
) -> None:
    admin_client.post("/settings/", {**PAGE_FORM, "check_interval_minutes": "60"})

    assert PortalSettings.load().check_interval_minutes == 60
    assert not settings_file(settings).exists()  # auto-upgrade is off, as LocalAI's default says


@pytest.mark.django_db
def test_a_file_that_cannot_be_written_does_not_undo_the_change_and_the_page_says_so(
    admin_client: Any, settings: Any, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    settings.PORTAL_CONFIG_DIR = str(blocker)

    response = admin_client.post("/settings/", {**PAGE_FORM, "auto_upgrade_backends": "on"}, follow=True)

    page = response.content.decode()
    assert "Settings saved." in page and "could not be shared with LocalAI" in page
    assert PortalSettings.load().auto_upgrade_backends is True


@pytest.mark.django_db
def test_off_keeps_the_portal_away_from_the_file(
    admin_client: Any, settings: Any, localai_file: Path
) -> None:
    settings.PORTAL_CONFIG_DIR = "off"

    admin_client.post("/settings/", {**PAGE_FORM, "auto_upgrade_backends": "on"})

    assert localai_file.read_text() == LOCALAI_WRITTEN
    assert PortalSettings.runtime_settings_path() is None


# --- read from the file --------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_files_value_is_applied_and_a_malformed_file_is_ignored(localai_file: Path) -> None:
    watcher = runtime_settings.Watcher(localai_file, 60, PortalSettings.load().apply_runtime_settings)
    localai_file.write_text(written_by_localai_with(**{": false": ": true"}))
    assert watcher.check() is True
    assert PortalSettings.load().auto_upgrade_backends is True

    localai_file.write_text('{"auto_upgrade_backends": "yes"}')  # LocalAI's decoder refuses it whole
    assert watcher.check() is False
    localai_file.write_text("{not json")
    assert watcher.check() is False
    assert PortalSettings.load().auto_upgrade_backends is True  # the last good value stands


def wait_for(condition: Any, what: str, deadline: float = 90) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"waited {deadline} s for {what}")


@pytest.fixture
def portal_process(settings: Any) -> Iterator[Any]:
    """Start a real worker or web server (its own process and environment) and stop it afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    logs = Path(settings.PORTAL_BACKENDS_PATH).parent / "process.log"

    def start(kind: str, **env: str) -> subprocess.Popen[bytes]:
        from tests.helpers.processes import free_port

        command = (
            [sys.executable, "manage.py", "worker", "--workers", "1"]
            if kind == "worker"
            else [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(free_port()),
                "portal.asgi:application",
            ]
        )
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=subprocess_env(PORTAL_CONFIG_POLL_INTERVAL="1", PORTAL_LOG_LEVEL="INFO", **env),
            stdout=logs.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
@pytest.mark.parametrize("kind", ["worker", "web"])
def test_a_running_process_reads_the_file_at_start_and_picks_up_an_edit_by_another_process(
    kind: str, localai_file: Path, portal_process: Any
) -> None:
    localai_file.write_text(
        written_by_localai_with(**{'"auto_upgrade_backends": false': '"auto_upgrade_backends": true'})
    )
    process = portal_process(kind)

    wait_for(lambda: PortalSettings.load().auto_upgrade_backends is True, "the value read at start")
    # Another process edits the file in place, as an editor or LocalAI's own writer does.
    subprocess.run(
        [sys.executable, "-c", f"open({str(localai_file)!r}, 'w').write({LOCALAI_WRITTEN!r})"], check=True
    )
    wait_for(lambda: PortalSettings.load().auto_upgrade_backends is False, "the edit to reach the database")

    assert process.poll() is None
    assert localai_file.read_text() == LOCALAI_WRITTEN  # applying it did not rewrite it


# --- the environment's lock -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"LOCALAI_AUTO_UPGRADE_BACKENDS": "true"}, ("LOCALAI_AUTO_UPGRADE_BACKENDS", "true", True)),
        ({"AUTO_UPGRADE_BACKENDS": "YES"}, ("AUTO_UPGRADE_BACKENDS", "YES", True)),
        (
            {"PORTAL_AUTO_UPGRADE": "1", "LOCALAI_AUTO_UPGRADE_BACKENDS": "false"},
            ("PORTAL_AUTO_UPGRADE", "1", True),
        ),
        (
            {"LOCALAI_AUTO_UPGRADE_BACKENDS": "0", "AUTO_UPGRADE_BACKENDS": "true"},
            ("LOCALAI_AUTO_UPGRADE_BACKENDS", "0", False),
        ),
        ({}, None),
    ],
)
def test_localais_spellings_are_read_in_its_order(
    monkeypatch: Any, environment: dict[str, str], expected: Any
) -> None:
    for name in ("PORTAL_AUTO_UPGRADE", "LOCALAI_AUTO_UPGRADE_BACKENDS", "AUTO_UPGRADE_BACKENDS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    assert (
        portal_settings.env_setting_lock(
            "PORTAL_AUTO_UPGRADE", "LOCALAI_AUTO_UPGRADE_BACKENDS", "AUTO_UPGRADE_BACKENDS"
        )
        == expected
    )


def test_a_malformed_value_locks_nothing_and_is_reported(monkeypatch: Any) -> None:
    monkeypatch.setenv("LOCALAI_AUTO_UPGRADE_BACKENDS", "sometimes")
    monkeypatch.setattr(portal_settings, "INVALID_SETTINGS", [])

    assert portal_settings.env_setting_lock("LOCALAI_AUTO_UPGRADE_BACKENDS") is None
    assert portal_settings.INVALID_SETTINGS == [
        "LOCALAI_AUTO_UPGRADE_BACKENDS='sometimes' is not true, 1, yes, false, 0 or no"
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_a_process_started_with_localais_variable_runs_with_auto_upgrade_locked_on() -> None:
    code = (
        "from backends_app.models import PortalSettings as P; row = P.load(); "
        "lock = P.environment_locks()['auto_upgrade_backends']; "
        "print(row.auto_upgrade_backends, row.auto_upgrade_enabled, lock)"
    )
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=REPO,
        env=subprocess_env(AUTO_UPGRADE_BACKENDS="yes"),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip().splitlines()[-1]
        == "False True set by the environment (AUTO_UPGRADE_BACKENDS=yes)"
    )


@pytest.mark.django_db
def test_the_settings_page_shows_the_lock_and_ignores_a_change(
    admin_client: Any, settings: Any, localai_file: Path
) -> None:
    settings.PORTAL_SETTINGS_FROM_ENVIRONMENT = LOCKED

    page = admin_client.get("/settings/").content.decode()
    admin_client.post("/settings/", {**PAGE_FORM, "auto_upgrade_backends": ""})
    admin_client.post("/settings/", {**PAGE_FORM, "check_interval_minutes": "90"})

    assert "set by the environment (LOCALAI_AUTO_UPGRADE_BACKENDS=true)" in page
    assert 'name="auto_upgrade_backends"' not in page
    row = PortalSettings.load()
    assert row.check_interval_minutes == 90 and row.auto_upgrade_backends is False
    assert localai_file.read_text() == LOCALAI_WRITTEN  # the stored value did not change


@pytest.mark.django_db
def test_the_admin_shows_the_lock_and_ignores_a_change(admin_client: Any, settings: Any) -> None:
    settings.PORTAL_SETTINGS_FROM_ENVIRONMENT = LOCKED
    url = f"/admin/backends_app/portalsettings/{PortalSettings.load().pk}/change/"

    page = admin_client.get(url).content.decode()
    response = admin_client.post(
        url, {**PAGE_FORM, "health_check_timeout": "30", "auto_upgrade_backends": "on"}
    )

    assert "set by the environment (LOCALAI_AUTO_UPGRADE_BACKENDS=true)" in page
    assert 'name="auto_upgrade_backends"' not in page
    assert response.status_code == 302
    assert PortalSettings.load().auto_upgrade_backends is False


@pytest.mark.django_db
def test_the_api_shows_the_lock_and_refuses_a_change(settings: Any) -> None:
    settings.PORTAL_SETTINGS_FROM_ENVIRONMENT = LOCKED
    api = client_for(make_user("ops", perms=("backends_app.change_portalsettings",)))

    shown = api.get("/api/v1/settings/").json()
    refused = api.patch("/api/v1/settings/", {"auto_upgrade_backends": False}, format="json")
    same = api.patch("/api/v1/settings/", {"auto_upgrade_backends": True, "versions_kept": 2}, format="json")

    assert shown["auto_upgrade_backends"] is True
    assert shown["set_by_environment"] == {
        "auto_upgrade_backends": "set by the environment (LOCALAI_AUTO_UPGRADE_BACKENDS=true)"
    }
    assert refused.status_code == 400
    assert "set by the environment" in refused.json()["auto_upgrade_backends"][0]
    assert same.status_code == 200 and same.json()["auto_upgrade_backends"] is True
    row = PortalSettings.load()
    assert row.auto_upgrade_backends is False and row.versions_kept == 2


@pytest.mark.django_db
def test_without_the_lock_the_stored_value_counts(settings: Any) -> None:
    user = get_user_model().objects.create(username="ops", is_superuser=True)
    settings.PORTAL_SETTINGS_FROM_ENVIRONMENT = {}
    api = client_for(user)

    assert (
        api.patch("/api/v1/settings/", {"auto_upgrade_backends": True}, format="json").json()[
            "set_by_environment"
        ]
        == {}
    )
    assert PortalSettings.load().auto_upgrade_enabled is True


def test_manage_py_check_warns_of_a_file_it_cannot_read_or_write(settings: Any, tmp_path: Path) -> None:
    from backends_app.system_checks import runtime_settings_problems

    path = settings_file(settings)
    path.parent.mkdir()
    path.write_text("{not json")
    assert [problem.id for problem in runtime_settings_problems()] == ["portal.W010"]

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings.PORTAL_CONFIG_DIR = str(blocker / "configuration")
    assert [problem.id for problem in runtime_settings_problems()] == ["portal.W011"]
    settings.PORTAL_CONFIG_DIR = "off"
    assert runtime_settings_problems() == []


@pytest.mark.django_db
def test_an_edit_arriving_while_the_previous_one_is_applied_is_not_written_over(localai_file: Path) -> None:
    from django.db.models.signals import post_save

    watcher = runtime_settings.Watcher(localai_file, 60, PortalSettings.load().apply_runtime_settings)
    turned_on = written_by_localai_with(**{'"auto_upgrade_backends": false': '"auto_upgrade_backends": true'})
    localai_file.write_text(turned_on)

    def edit_meanwhile(**kwargs: Any) -> None:  # LocalAI (or an editor) turns it off again just then
        localai_file.write_text(LOCALAI_WRITTEN)

    post_save.connect(edit_meanwhile, sender=PortalSettings, dispatch_uid="edit-meanwhile")
    try:
        assert watcher.check() is True
    finally:
        post_save.disconnect(dispatch_uid="edit-meanwhile", sender=PortalSettings)

    assert localai_file.read_text() == LOCALAI_WRITTEN  # the newer edit is kept
    assert watcher.check() is True
    assert PortalSettings.load().auto_upgrade_backends is False
