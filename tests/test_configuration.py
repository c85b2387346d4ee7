"""Configuration: environment settings, system checks, the defaults migrate seeds, the local node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.checks import run_checks

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
