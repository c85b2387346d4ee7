"""Defaults made after each migrate: the configured galleries and the settings row."""

from __future__ import annotations

from typing import Any

from backends_app.checks import configured_galleries


def seed_defaults(**kwargs: Any) -> None:
    """Create the galleries named in PORTAL_GALLERIES that do not exist yet; never overwrite edits."""
    from backends_app.models import Gallery, PortalSettings

    try:
        galleries = configured_galleries()
    except ValueError:
        galleries = []  # reported by the system check
    for name, url in galleries:
        Gallery.objects.get_or_create(name=name, defaults={"url": url})
    PortalSettings.load()
