"""`{% monitoring_facts %}`: where /metrics is and who may read it, on the settings page and in the
admin's settings form, without either view having to pass it in."""

from __future__ import annotations

from typing import Any

from django import template

from backends_app import metrics

register = template.Library()


@register.inclusion_tag("monitoring/facts.html", takes_context=True)
def monitoring_facts(context: dict[str, Any], style: str = "page") -> dict[str, Any]:
    return {**metrics.monitoring_facts(context.get("request")), "style": style}
