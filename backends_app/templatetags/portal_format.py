"""Sizes and moments, said one way everywhere: the pages, the admin and the job log.

Sizes in binary units (KiB, MiB, GiB: what the download progress counts in), one decimal above bytes.
Moments in the portal's time zone, as `portal/formats/en/formats.py` says (``2025-06-01 14:03:05 UTC``).
`static/portal/job.js` formats live sizes with the same rule; live moments come from the server.

In templates: ``{% load portal_format %}`` then ``{{ job.bytes_total|binary_size }}`` and
``{{ job.created_at|moment }}``. In Python: `format_size` and `format_moment`.
"""

from __future__ import annotations

import datetime as dt

from django import template
from django.utils import formats, timezone

register = template.Library()

SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
NBSP = "\u00a0"  # a size never wraps between its number and its unit


def format_size(value: int | float | None) -> str:
    """``512 B``, ``1.5 MiB``, ``2.0 GiB``; an empty string for None or a value that is not a number."""
    if value is None or isinstance(value, bool):
        return ""
    try:
        amount = float(value)
    except (TypeError, ValueError):
        return ""
    unit = 0
    while abs(amount) >= 1024 and unit < len(SIZE_UNITS) - 1:
        amount /= 1024
        unit += 1
    number = f"{amount:.1f}" if unit else f"{amount:.0f}"
    return f"{number}{NBSP}{SIZE_UNITS[unit]}"


def format_moment(value: dt.datetime | None) -> str:
    """A moment in the portal's time zone and its one format; an empty string for None."""
    if value is None:
        return ""
    if timezone.is_aware(value):
        value = timezone.localtime(value)
    return formats.date_format(value, "DATETIME_FORMAT")


@register.filter
def binary_size(value: int | float | None) -> str:
    return format_size(value)


@register.filter
def moment(value: dt.datetime | None) -> str:
    return format_moment(value)
