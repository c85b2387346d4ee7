"""System checks: a misconfiguration is reported with a clear message, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register

from backends_app import runtime_settings
from backends_app.disk import layout


def configured_galleries(value: str | None = None) -> list[tuple[str, str]]:
    """The galleries named by PORTAL_GALLERIES as (name, url) pairs.

    Two forms: LocalAI's JSON list (`[{"name": "localai", "url": "github:..."}]`) or a comma-separated
    list of `name=url`. Raises ValueError with a message naming the problem.
    """
    text = (settings.PORTAL_GALLERIES if value is None else value).strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"PORTAL_GALLERIES is not valid JSON: {exc}") from exc
        pairs = []
        for item in items:
            if not isinstance(item, dict) or not item.get("name") or not item.get("url"):
                raise ValueError(f"PORTAL_GALLERIES: each item needs a name and a url, got {item!r}")
            pairs.append((str(item["name"]), str(item["url"])))
        return pairs
    pairs = []
    for part in text.split(","):
        name, sep, url = part.strip().partition("=")
        if not sep or not name.strip() or not url.strip():
            raise ValueError(f"PORTAL_GALLERIES: {part.strip()!r} is not of the form name=url")
        pairs.append((name.strip(), url.strip()))
    return pairs


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@register()
def portal_settings_check(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    problems: list[Error | Warning] = [
        Error(f"Invalid setting: {text}", id="portal.E001") for text in settings.INVALID_SETTINGS
    ]
    try:
        configured_galleries()
    except ValueError as exc:
        problems.append(Error(str(exc), id="portal.E002"))
    backends = Path(settings.PORTAL_BACKENDS_PATH)
    anchor = _nearest_existing(backends)
    if backends.exists() and not backends.is_dir():
        problems.append(
            Error(f"PORTAL_BACKENDS_PATH={backends} exists and is not a directory", id="portal.E003")
        )
    elif not os.access(anchor, os.W_OK):
        problems.append(
            Error(f"PORTAL_BACKENDS_PATH={backends} is not writable (checked {anchor})", id="portal.E004")
        )
    problems += [
        Error(
            f"PORTAL_STATE_PATH: {problem}",
            hint="Leave PORTAL_STATE_PATH unset to use a directory beside the backends directory.",
            id="portal.E005",
        )
        for problem in layout.state_path_problems(backends, settings.PORTAL_STATE_PATH)
    ]
    if len(settings.PORTAL_PLATFORM.split("/")) not in (2, 3):
        problems.append(
            Error(f"PORTAL_PLATFORM={settings.PORTAL_PLATFORM!r} is not os/arch[/variant]", id="portal.E007")
        )
    engine = settings.DATABASES["default"]["ENGINE"]
    if not engine.endswith(("sqlite3", "postgresql")):
        problems.append(
            Error(
                f"DATABASE_URL selects {engine}; only SQLite and PostgreSQL are supported", id="portal.E008"
            )
        )
    if settings.REDIS_URL and not settings.REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
        problems.append(Error(f"REDIS_URL={settings.REDIS_URL!r} is not a redis:// URL", id="portal.E009"))
    return problems + runtime_settings_problems()


def runtime_settings_problems() -> list[Error | Warning]:
    """LocalAI's runtime_settings.json, when shared: readable, and its directory writable."""
    from backends_app.models import PortalSettings

    path = PortalSettings.runtime_settings_path()
    if path is None:
        return []
    problems: list[Error | Warning] = []
    try:
        runtime_settings.typed(runtime_settings.read(path))
    except runtime_settings.RuntimeSettingsError as exc:
        problems.append(Warning(f"{exc}: it is ignored, and not written over", id="portal.W010"))
    anchor = _nearest_existing(path)
    if not os.access(anchor, os.W_OK) or (anchor != path and not anchor.is_dir()):
        problems.append(
            Warning(
                f"{path} cannot be written (checked {anchor}): settings changes will not reach LocalAI",
                hint="Set PORTAL_CONFIG_DIR to LocalAI's configuration directory, or to off.",
                id="portal.W011",
            )
        )
    return problems
