"""LocalAI's `GET/POST /api/settings`, with LocalAI's own tests ported one for one
(core/http/endpoints/localai/settings_test.go, "Settings endpoints"), then the portal's part of it:
what it applies, what it keeps for LocalAI, who may call it, and the environment's lock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token

from backends_app import runtime_settings
from backends_app.models import PortalSettings
from tests.helpers.api import client_for, make_user

pytestmark = pytest.mark.django_db

CHANGE = ("backends_app.change_portalsettings",)


@pytest.fixture
def config_dir(settings: Any, tmp_path: Path) -> Path:
    """As LocalAI's suite sets `DynamicConfigsDir = <tmp>`."""
    settings.PORTAL_CONFIG_DIR = str(tmp_path / "configuration")
    return tmp_path / "configuration"


@pytest.fixture
def api(config_dir: Path) -> Any:
    return client_for(make_user("ops", perms=CHANGE), keyword="Bearer")


def post(api: Any, body: str) -> Any:
    return api.generic("POST", "/api/settings", body, content_type="application/json")


def on_disk(config_dir: Path) -> dict[str, Any]:
    return json.loads((config_dir / "runtime_settings.json").read_text())


# --- LocalAI's tests ---------------------------------------------------------------------------------


def test_get_returns_the_current_runtime_settings(api: Any) -> None:
    response = api.get("/api/settings")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json()


def test_rejects_malformed_json(api: Any, config_dir: Path) -> None:
    response = post(api, "{not json")

    assert response.status_code == 400
    assert "Failed to parse JSON" in response.content.decode()
    assert response.json()["success"] is False
    assert not (config_dir / "runtime_settings.json").exists()


def test_rejects_an_invalid_watchdog_timeout_duration(api: Any) -> None:
    response = post(api, '{"watchdog_idle_timeout":"notaduration"}')

    assert response.status_code == 400
    assert "Invalid watchdog_idle_timeout" in response.content.decode()
    assert response.json() == {
        "success": False,
        "error": 'Invalid watchdog_idle_timeout format: time: invalid duration "notaduration"',
    }


def test_errors_when_the_config_dir_is_unset(api: Any, settings: Any) -> None:
    settings.PORTAL_CONFIG_DIR = "off"

    response = post(api, "{}")

    assert response.status_code == 400
    assert "DynamicConfigsDir is not set" in response.content.decode()


def test_saves_valid_settings_to_runtime_settings_json(api: Any, config_dir: Path) -> None:
    response = post(api, "{}")

    assert response.status_code == 200
    assert "Settings updated successfully" in response.content.decode()
    assert (config_dir / "runtime_settings.json").exists()


def test_preserves_unrelated_persisted_settings_when_a_partial_post_sets_only_mitm_listen(
    api: Any, config_dir: Path
) -> None:
    first = post(
        api,
        '{"mitm_listen":"127.0.0.1:0","galleries":[{"name":"g1","url":"http://example/g1"}],'
        '"api_keys":["k1"],"pii_default_detectors":["det-a"]}',
    )
    assert first.status_code == 200, first.content

    second = post(api, '{"mitm_listen":"127.0.0.1:0"}')
    assert second.status_code == 200, second.content

    stored = on_disk(config_dir)
    assert stored["mitm_listen"] == "127.0.0.1:0"
    assert stored["galleries"] == [{"url": "http://example/g1", "name": "g1"}]
    assert stored["api_keys"] == ["k1"]
    assert stored["pii_default_detectors"] == ["det-a"]


# --- the portal's part -------------------------------------------------------------------------------


def test_a_partial_post_of_auto_upgrade_applies_it_and_keeps_the_other_keys(
    api: Any, config_dir: Path
) -> None:
    post(api, '{"watchdog_enabled":true,"galleries":[{"name":"g1","url":"http://example/g1"}]}')

    response = post(api, '{"auto_upgrade_backends":true}')

    assert response.json() == {"success": True, "message": "Settings updated successfully"}
    row = PortalSettings.load()
    assert row.auto_upgrade_backends is True and row.auto_upgrade_enabled is True
    assert on_disk(config_dir) == {
        "watchdog_enabled": True,
        "auto_upgrade_backends": True,
        "galleries": [{"url": "http://example/g1", "name": "g1"}],
        "api_keys": None,
        "pii_default_detectors": None,
    }
    assert api.get("/api/settings").json()["auto_upgrade_backends"] is True


def test_get_answers_every_localai_key_in_its_order_with_credentials_hidden(
    api: Any, config_dir: Path
) -> None:
    config_dir.mkdir()
    (config_dir / "runtime_settings.json").write_text(
        json.dumps({"api_keys": ["secret-key"], "p2p_token": "secret-token", "threads": 6, "debug": True})
    )
    PortalSettings.objects.filter(pk=PortalSettings.SINGLETON_PK).update(auto_upgrade_backends=True)

    body = api.get("/api/settings").json()

    assert list(body) == list(runtime_settings.KEYS)
    assert body["auto_upgrade_backends"] is True  # the portal's own value
    assert body["threads"] == 6 and body["debug"] is True  # the file's
    assert body["watchdog_idle_timeout"] == "15m" and body["autoload_backend_galleries"] is True  # defaults
    assert body["api_keys"] is None and body["p2p_token"] is None
    assert "secret" not in json.dumps(body)


def test_the_whole_object_posted_back_with_localais_junk_keys_changes_nothing_it_should_not(
    api: Any, config_dir: Path
) -> None:
    config_dir.mkdir()
    (config_dir / "runtime_settings.json").write_text(
        json.dumps({"api_keys": ["k1"], "p2p_token": "tok", "logo_file": "logo.png"})
    )
    shown = api.get("/api/settings").json()
    # LocalAI's settings page sends its own extra fields and has lost track of the uploaded logo.
    body = {**shown, "galleries_json": "[]", "backend_galleries_json": "[]", "logo_file": "", "debug": True}

    response = post(api, json.dumps(body))

    assert response.status_code == 200, response.content
    stored = on_disk(config_dir)
    assert "galleries_json" not in stored and "backend_galleries_json" not in stored
    assert stored["api_keys"] == ["k1"] and stored["p2p_token"] == "tok"  # null posted back: kept
    assert stored["logo_file"] == "logo.png"  # LocalAI's asset upload owns it
    assert stored["debug"] is True
    assert list(stored) == [key for key in runtime_settings.KEYS if key in stored]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            '{"auto_upgrade_backends":"yes"}',
            "Failed to parse JSON: json: cannot unmarshal string into Go struct field "
            "RuntimeSettings.auto_upgrade_backends of type bool",
        ),
        (
            '{"threads":1.5}',
            "Failed to parse JSON: json: cannot unmarshal number 1.5 into Go struct field "
            "RuntimeSettings.threads of type int",
        ),
        (
            "[]",
            "Failed to parse JSON: json: cannot unmarshal array into Go value of type config.RuntimeSettings",
        ),
        (
            '{"lru_eviction_retry_interval":"5"}',
            "Invalid lru_eviction_retry_interval format: time: missing unit",
        ),
        (
            '{"open_responses_store_ttl":"1x"}',
            'Invalid open_responses_store_ttl format: time: unknown unit "x"',
        ),
        ('{"vram_budget":"150%"}', 'Invalid vram_budget format: vram budget "150%" exceeds 100%'),
        ('{"p2p_token":"0"}', "which only LocalAI can make"),
    ],
)
def test_what_localai_refuses_is_refused_and_nothing_is_written(
    api: Any, config_dir: Path, body: str, error: str
) -> None:
    response = post(api, body)

    assert response.status_code == 400
    assert response.json()["success"] is False and error in response.json()["error"]
    assert not (config_dir / "runtime_settings.json").exists()
    assert PortalSettings.load().auto_upgrade_backends is False


def test_keys_match_case_insensitively_and_null_means_not_set(api: Any, config_dir: Path) -> None:
    response = post(api, '{"Auto_Upgrade_Backends":true,"debug":null}')

    assert response.status_code == 200
    assert PortalSettings.load().auto_upgrade_backends is True
    assert "debug" not in on_disk(config_dir)


def test_a_file_that_is_not_json_is_not_written_over(api: Any, config_dir: Path) -> None:
    config_dir.mkdir()
    (config_dir / "runtime_settings.json").write_text("{half written")

    response = post(api, '{"auto_upgrade_backends":true}')

    assert response.status_code == 500
    assert response.json()["error"].startswith("Failed to read existing settings:")
    assert (config_dir / "runtime_settings.json").read_text() == "{half written"
    assert PortalSettings.load().auto_upgrade_backends is False


def test_the_environments_lock_refuses_a_change_and_takes_its_own_value_back(
    api: Any, config_dir: Path, settings: Any
) -> None:
    settings.PORTAL_SETTINGS_FROM_ENVIRONMENT = {
        "auto_upgrade_backends": ("LOCALAI_AUTO_UPGRADE_BACKENDS", "true", True)
    }

    shown = api.get("/api/settings").json()
    refused = post(api, '{"auto_upgrade_backends":false}')
    same = post(api, '{"auto_upgrade_backends":true,"debug":true}')

    assert shown["auto_upgrade_backends"] is True
    assert refused.status_code == 400 and refused.json()["success"] is False
    assert "set by the environment (LOCALAI_AUTO_UPGRADE_BACKENDS=true)" in refused.json()["error"]
    assert same.status_code == 200
    assert "auto_upgrade_backends" not in on_disk(config_dir)  # the environment's value is not stored
    assert on_disk(config_dir)["debug"] is True
    assert PortalSettings.load().auto_upgrade_backends is False


def test_reading_needs_a_signed_in_user_and_changing_needs_the_settings_permission(config_dir: Path) -> None:
    anonymous = Client().get("/api/settings")
    reader = client_for(make_user("reader"), keyword="Bearer")

    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == 401
    assert reader.get("/api/settings").status_code == 200
    refused = post(reader, '{"auto_upgrade_backends":true}')
    assert refused.status_code == 403 and refused.json()["error"]["code"] == 403
    assert PortalSettings.load().auto_upgrade_backends is False
    assert not (config_dir / "runtime_settings.json").exists()


def test_a_session_needs_its_csrf_token_and_a_bearer_token_does_not(config_dir: Path) -> None:
    user = make_user("admin", superuser=True)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)

    without_token = browser.post(
        "/api/settings", '{"auto_upgrade_backends":true}', content_type="application/json"
    )
    bearer = Client(enforce_csrf_checks=True).post(
        "/api/settings",
        '{"auto_upgrade_backends":true}',
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {Token.objects.create(user=user).key}",
    )

    assert without_token.status_code == 403
    assert bearer.status_code == 200 and PortalSettings.load().auto_upgrade_backends is True


def test_the_portals_own_settings_route_keeps_its_shape(api: Any) -> None:
    own = api.get("/api/v1/settings/").json()
    localai = api.get("/api/settings").json()
    localai_slashed = api.get("/api/settings/").json()  # LocalAI strips a trailing slash

    assert "check_interval_minutes" in own and "watchdog_enabled" not in own
    assert "watchdog_enabled" in localai and "check_interval_minutes" not in localai
    assert localai_slashed == localai
