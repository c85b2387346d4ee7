"""System checks: a misconfiguration is reported with a clear message, never a traceback."""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register

from backends_app import notify, runtime_settings
from backends_app.disk import layout
from backends_app.oci import signatures


@dataclass(frozen=True)
class ConfiguredGallery:
    """One gallery PORTAL_GALLERIES names, with its signature policy when the JSON form gives one."""

    name: str
    url: str
    verification: signatures.Verification | None = None
    signature_mode: str | None = None


def configured_gallery_items(value: str | None = None) -> list[ConfiguredGallery]:
    """The galleries named by PORTAL_GALLERIES.

    Two forms: LocalAI's JSON list (`[{"name": "localai", "url": "github:...", "verification":
    {"issuer": ..., "identity_regex": ...}}]`, as LOCALAI_BACKEND_GALLERIES takes it; the portal
    also reads `signature_mode`: off, warn or enforce) or a comma-separated list of `name=url`.
    Raises ValueError with a message naming the problem.
    """
    text = (settings.PORTAL_GALLERIES if value is None else value).strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"PORTAL_GALLERIES is not valid JSON: {exc}") from exc
        galleries = []
        for item in items:
            if not isinstance(item, dict) or not item.get("name") or not item.get("url"):
                raise ValueError(f"PORTAL_GALLERIES: each item needs a name and a url, got {item!r}")
            name = str(item["name"])
            try:
                block = item.get("verification")
                verification = None if block is None else signatures.Verification.from_json(block)
            except ValueError as exc:
                raise ValueError(f"PORTAL_GALLERIES: gallery {name!r}: {exc}") from None
            mode = item.get("signature_mode")
            if mode is not None and mode not in signatures.MODES:
                raise ValueError(
                    f"PORTAL_GALLERIES: gallery {name!r}: signature_mode must be one of "
                    f"{', '.join(signatures.MODES)}, not {mode!r}"
                )
            if mode in (signatures.WARN, signatures.ENFORCE) and verification is None:
                raise ValueError(
                    f"PORTAL_GALLERIES: gallery {name!r}: signature_mode {mode} needs a verification block"
                )
            galleries.append(ConfiguredGallery(name, str(item["url"]), verification, mode))
        return galleries
    galleries = []
    for part in text.split(","):
        name, sep, url = part.strip().partition("=")
        if not sep or not name.strip() or not url.strip():
            raise ValueError(f"PORTAL_GALLERIES: {part.strip()!r} is not of the form name=url")
        galleries.append(ConfiguredGallery(name.strip(), url.strip()))
    return galleries


def configured_galleries(value: str | None = None) -> list[tuple[str, str]]:
    """The galleries named by PORTAL_GALLERIES as (name, url) pairs (see `configured_gallery_items`)."""
    return [(item.name, item.url) for item in configured_gallery_items(value)]


def _unanchored(pattern: str) -> bool:
    return bool(pattern) and not (pattern.startswith(("^", r"\A")) and pattern.endswith(("$", r"\z")))


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
        galleries = configured_gallery_items()
    except ValueError as exc:
        galleries = []
        problems.append(Error(str(exc), id="portal.E002"))
    for item in galleries:
        block = item.verification
        if block is not None and (_unanchored(block.identity_regex) or _unanchored(block.issuer_regex)):
            problems.append(
                Warning(
                    f"PORTAL_GALLERIES: gallery {item.name!r}: an unanchored regex in verification "
                    "matches anywhere in the value (a fork's workflow URL may contain yours)",
                    hint="Write it as ^...$, as LocalAI's own example does.",
                    id="portal.W010",
                )
            )
    problems += _trust_root_problems(settings.PORTAL_SIGSTORE_TRUSTED_ROOT)
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


@register()
def notification_settings_check(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    """PORTAL_NOTIFY_URLS and PORTAL_BASE_URL (docs/notifications.md). A bad URL is named by its
    position, never repeated: it may hold a token."""
    problems: list[Error | Warning] = []
    for position, url in enumerate(settings.PORTAL_NOTIFY_URLS, start=1):
        try:
            notify.check_url(url)
        except notify.NotifyError as exc:
            problems.append(Error(f"PORTAL_NOTIFY_URLS item {position}: {exc}", id="portal.E030"))
    base = urllib.parse.urlsplit(settings.PORTAL_BASE_URL)
    if base.scheme not in ("http", "https") or not base.netloc or base.query or base.fragment:
        problems.append(
            Error(
                f"PORTAL_BASE_URL={settings.PORTAL_BASE_URL!r} is not an http(s)://host[:port][/path] "
                "address",
                hint="Notification links start with it: the address operators open the portal at.",
                id="portal.E031",
            )
        )
    return problems


def _trust_root_problems(path: str) -> list[Error | Warning]:
    """A trust root file that cannot be what sigstore reads. Only its kind is checked here: loading
    it (with sigstore) waits for the first verification."""
    if not path:
        return []
    try:
        with open(path, "rb") as handle:
            media_type = json.loads(handle.read(16 * 1024 * 1024)).get("mediaType", "")
    except (OSError, ValueError, AttributeError) as exc:
        return [
            Error(f"PORTAL_SIGSTORE_TRUSTED_ROOT={path}: cannot be read as JSON: {exc}", id="portal.E010")
        ]
    if media_type not in (signatures.TRUSTED_ROOT_TYPE, signatures.CLIENT_TRUST_CONFIG_TYPE):
        return [
            Error(
                f"PORTAL_SIGSTORE_TRUSTED_ROOT={path}: mediaType {media_type!r} is neither a Sigstore "
                "trusted root nor a client trust config",
                id="portal.E010",
            )
        ]
    return []
