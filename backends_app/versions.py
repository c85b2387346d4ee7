"""Ordering backend versions: what "newer" and "older" mean, for the check and for rollbacks.

Plain functions, no Django: the upgrade check (`detection`) asks whether a gallery version is an
upgrade, and `Backend.rollback_target_on` and the rollback procedure ask whether a kept version is
older than the live one, so a "rollback" never goes forward.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from packaging.version import InvalidVersion, Version

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*)?$"
)


def _strip_v(text: str) -> str:
    text = text.strip()
    return text[1:] if text[:1] in ("v", "V") and text[1:2].isdigit() else text


def _pep440(text: str) -> Version | None:
    try:
        return Version(_strip_v(text))
    except InvalidVersion:
        return None


def _semver_key(text: str) -> tuple[Any, ...] | None:
    """Semantic-version precedence (semver.org item 11) as a sortable tuple; None if not semver."""
    match = _SEMVER.match(_strip_v(text))
    if not match:
        return None
    major, minor, patch, pre = match.groups()
    if pre is None:
        # A release sorts after every pre-release of the same version.
        return (int(major), int(minor), int(patch), 1, ())
    fields = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in pre.split("."))
    return (int(major), int(minor), int(patch), 0, fields)


def order_versions(first: str, second: str) -> int | None:
    """-1, 0 or 1 as `second` is lower, equal or higher than `first`; None unless both parse as
    PEP 440 versions or both as semantic versions."""
    a, b = _pep440(first), _pep440(second)
    if a is not None and b is not None:
        return (b > a) - (b < a)
    sa, sb = _semver_key(first), _semver_key(second)
    if sa is not None and sb is not None:
        return (sb > sa) - (sb < sa)
    return None


def compare_versions(installed: str, available: str) -> int | None:
    """-1, 0 or 1 as `available` is lower, equal or higher than `installed`; None if not orderable.

    Both parse as PEP 440 or both as semantic versions: ordered. Neither parses: plain equality
    (0 or 1). Only one parses: None, the caller falls back to the image digest.
    """
    order = order_versions(installed, available)
    if order is not None:
        return order
    parses = [(_pep440(text) or _semver_key(text)) is not None for text in (installed, available)]
    if not any(parses):
        return 0 if installed.strip() == available.strip() else 1
    return None


def is_older(
    kept_version: str,
    kept_installed_at: dt.datetime | None,
    live_version: str,
    live_installed_at: dt.datetime | None,
) -> bool:
    """Whether a kept build is older than the live one, so putting it back is a rollback.

    The versions decide when both order and differ; otherwise when each was installed (a rebuild
    under the same version, versions that do not parse; LocalAI's `installed_at` counts whole
    seconds). Nothing to tell them apart by: True, the kept build is what the procedure has always
    put back.
    """
    if kept_version and live_version:
        order = order_versions(live_version, kept_version)
        if order:
            return order < 0
    if (
        kept_installed_at is not None
        and live_installed_at is not None
        and kept_installed_at != live_installed_at
    ):
        return kept_installed_at < live_installed_at
    return True
