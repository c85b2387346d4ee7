"""The settings endpoint: read, change some fields, and refuse bad input without saving anything."""

from __future__ import annotations

from typing import Any

import pytest
from django.forms.models import model_to_dict

from backends_app.models import PortalSettings
from tests.helpers.api import client_for, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> Any:
    return client_for(make_user("ops", perms=("backends_app.change_portalsettings",)))


def stored() -> dict[str, Any]:
    return model_to_dict(PortalSettings.load())


def test_the_settings_show_every_field(api: Any) -> None:
    body = api.get("/api/v1/settings/").json()

    assert set(body) == {
        "auto_upgrade_backends",
        "check_interval_minutes",
        "maintenance_window_start",
        "maintenance_window_end",
        "versions_kept",
        "health_check_command",
        "health_check_timeout",
        "last_check_at",
        "updated_at",
        "set_by_environment",
    }
    assert body["check_interval_minutes"] == 360 and body["versions_kept"] == 1


def test_patch_changes_only_the_fields_sent(api: Any) -> None:
    response = api.patch(
        "/api/v1/settings/",
        {
            "auto_upgrade_backends": True,
            "check_interval_minutes": 30,
            "maintenance_window_start": "22:00",
            "maintenance_window_end": "04:30",
        },
        format="json",
    )

    assert response.status_code == 200
    row = PortalSettings.load()
    assert row.auto_upgrade_backends and row.check_interval_minutes == 30
    assert str(row.maintenance_window_start) == "22:00:00" and str(row.maintenance_window_end) == "04:30:00"
    assert row.versions_kept == 1  # untouched
    assert response.json()["maintenance_window_end"] == "04:30:00"


def test_the_window_can_be_cleared_by_sending_both_ends_null(api: Any) -> None:
    api.patch("/api/v1/settings/", {"maintenance_window_start": "01:00", "maintenance_window_end": "02:00"})

    response = api.patch(
        "/api/v1/settings/", {"maintenance_window_start": None, "maintenance_window_end": None}, format="json"
    )

    assert response.status_code == 200
    assert PortalSettings.load().maintenance_window_start is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"check_interval_minutes": 4}, "check_interval_minutes"),
        ({"check_interval_minutes": 44641}, "check_interval_minutes"),
        ({"check_interval_minutes": 10**30}, "check_interval_minutes"),
        ({"check_interval_minutes": "often"}, "check_interval_minutes"),
        ({"check_interval_minutes": 12.5}, "check_interval_minutes"),
        ({"versions_kept": 11}, "versions_kept"),
        ({"versions_kept": -1}, "versions_kept"),
        ({"health_check_timeout": 0}, "health_check_timeout"),
        ({"health_check_timeout": 10**30}, "health_check_timeout"),
        ({"health_check_command": "x" * 1001}, "health_check_command"),
        ({"health_check_command": "echo \u0000"}, "health_check_command"),
        ({"auto_upgrade_backends": "sometimes"}, "auto_upgrade_backends"),
        (
            {"maintenance_window_start": "25:00", "maintenance_window_end": "02:00"},
            "maintenance_window_start",
        ),
        ({"maintenance_window_start": "22:00"}, "maintenance_window_start"),
        ({"maintenance_window_start": "03:00", "maintenance_window_end": "03:00"}, "maintenance_window_end"),
        ({"check_interval_minutes": 60, "versions_kept": 99}, "versions_kept"),
    ],
)
def test_bad_settings_are_a_400_naming_the_field_and_nothing_is_saved(
    api: Any, body: dict[str, Any], field: str
) -> None:
    before = stored()

    response = api.patch("/api/v1/settings/", body, format="json")

    assert response.status_code == 400
    assert field in response.json()
    assert stored() == before


@pytest.mark.parametrize(
    "raw", ['{"check_interval_minutes": ', "[]", "null", '{"versions_kept": NaN}', "1" * 5000]
)
def test_a_body_that_is_not_a_settings_object_is_a_400(api: Any, raw: str) -> None:
    before = stored()

    response = api.generic("PATCH", "/api/v1/settings/", raw, content_type="application/json")

    assert response.status_code == 400
    assert stored() == before


def test_last_check_at_cannot_be_written(api: Any) -> None:
    before = stored()

    response = api.patch("/api/v1/settings/", {"last_check_at": "2020-01-01T00:00:00Z"}, format="json")

    assert response.status_code == 400 and "Read-only field" in response.json()["last_check_at"][0]
    assert PortalSettings.load().last_check_at is None
    assert stored() == before


def test_settings_are_not_replaced_or_deleted_wholesale(api: Any) -> None:
    assert api.put("/api/v1/settings/", {}, format="json").status_code == 405
    assert api.delete("/api/v1/settings/").status_code == 405


@pytest.mark.parametrize("value", ["22:00Z", "22:00:00+02:00", "22:00-0500", "10pm", "24:00"])
def test_a_window_time_with_an_offset_or_out_of_range_is_a_400(api: Any, value: str) -> None:
    response = api.patch(
        "/api/v1/settings/",
        {"maintenance_window_start": value, "maintenance_window_end": "23:00"},
        format="json",
    )

    assert response.status_code == 400 and "maintenance_window_start" in response.json()
    assert PortalSettings.load().maintenance_window_start is None
