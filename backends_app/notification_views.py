"""The settings page's notification card: the Apprise URLs (masked), add, remove, send a test.

Every view needs the settings permission (`change_portalsettings`), as the admin and the API do: the
URLs hold secrets. A URL is written here and never shown back whole.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_POST

from backends_app import notifications, permissions
from backends_app.models import NotificationTarget

LOGIN_URL = "ui:login"


class NotificationTargetForm(forms.ModelForm):
    """Add one URL; the model's clean() decides (Apprise can use it, not listed twice)."""

    class Meta:
        model = NotificationTarget
        fields = ["label", "url"]
        widgets = {
            "url": forms.TextInput(
                attrs={
                    "autocomplete": "off",
                    "spellcheck": "false",
                    "placeholder": "ntfys://...",
                    "style": "display: block; width: 100%; max-width: 42rem",
                }
            )
        }


def card(user: Any) -> dict[str, Any]:
    """What the settings page shows about notifications (for those who may see the settings)."""
    latest = notifications.target_status()
    return {
        "targets": [(target, latest.get(target.pk)) for target in NotificationTarget.objects.order_by("pk")],
        "form": NotificationTargetForm(),
        "recent": notifications.recent_deliveries(),
        "waiting": notifications.waiting_count(),
    }


def _allowed(request: HttpRequest) -> None:
    if not permissions.can(request.user, permissions.CHANGE_SETTINGS):
        raise PermissionDenied


def _back() -> HttpResponse:
    return redirect("/settings/#notifications")


@require_POST
@login_required(login_url=LOGIN_URL)
def add_target(request: HttpRequest) -> HttpResponse:
    _allowed(request)
    form = NotificationTargetForm(request.POST)
    if form.is_valid():
        target = form.save()
        messages.success(request, f"Notification URL {target.masked_url} added.")
    else:
        errors = "; ".join(str(error) for field in form.errors.values() for error in field)
        messages.error(request, f"Nothing was added: {errors}")
    return _back()


@require_POST
@login_required(login_url=LOGIN_URL)
def remove_target(request: HttpRequest, pk: int) -> HttpResponse:
    _allowed(request)
    target = get_object_or_404(NotificationTarget, pk=pk)
    shown = target.masked_url
    target.delete()
    messages.success(request, f"Notification URL {shown} removed.")
    return _back()


@require_POST
@login_required(login_url=LOGIN_URL)
def toggle_target(request: HttpRequest, pk: int) -> HttpResponse:
    _allowed(request)
    target = get_object_or_404(NotificationTarget, pk=pk)
    target.enabled = not target.enabled
    target.save(update_fields=["enabled", "updated_at"])
    messages.success(request, f"{target.masked_url} {'enabled' if target.enabled else 'disabled'}.")
    return _back()


@require_POST
@login_required(login_url=LOGIN_URL)
def send_test(request: HttpRequest) -> HttpResponse:
    """Send a test message now to every enabled URL (or the one posted as `target`); one line each."""
    _allowed(request)
    targets = NotificationTarget.objects.order_by("pk")
    if request.POST.get("target"):
        targets = (
            targets.filter(pk=request.POST["target"]) if request.POST["target"].isdigit() else targets.none()
        )
    else:
        targets = targets.filter(enabled=True)
    chosen = list(targets)
    if not chosen:
        messages.warning(request, "No notification URL to test: add one (and enable it) first.")
        return _back()
    for target, outcome in NotificationTarget.send_test(chosen):
        if outcome.ok:
            messages.success(request, f"Test message delivered to {target}.")
        else:
            messages.error(request, f"Test message to {target}: {outcome.result.value}: {outcome.detail}")
    return _back()
