"""The admin's notification pages: URLs (masked; a "send test" action), events, deliveries.

The URLs hold secrets: they need the settings permission to see or change, the change form never
shows the stored URL (leave the field blank to keep it), and lists show `masked_url`. Events and
deliveries are records the portal writes: read-only, for those who may see the settings or operate.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from backends_app import permissions
from backends_app.models import (
    NotificationDelivery,
    NotificationEvent,
    NotificationTarget,
)


class NotificationTargetForm(forms.ModelForm):
    """The stored URL is never rendered back: blank keeps it, anything else replaces it."""

    url = forms.CharField(
        label="Apprise URL",
        required=False,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false", "size": 80}),
        help_text=NotificationTarget._meta.get_field("url").help_text,
    )

    class Meta:
        model = NotificationTarget
        fields = ["label", "url", "enabled"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial["url"] = ""
        if self.instance.pk:
            self.fields[
                "url"
            ].help_text = (
                f"Stored: {self.instance.masked_url}. Leave blank to keep it; type a URL to replace it."
            )

    def clean_url(self) -> str:
        value = self.cleaned_data.get("url", "").strip()
        if not value and self.instance.pk:
            return self.instance.url
        if not value:
            raise forms.ValidationError("An Apprise URL is needed.")
        return value


def can_see(request: HttpRequest) -> bool:
    return permissions.can(request.user, permissions.CHANGE_SETTINGS) or permissions.can(
        request.user, permissions.OPERATE
    )


@admin.register(NotificationTarget)
class NotificationTargetAdmin(admin.ModelAdmin):
    form = NotificationTargetForm
    list_display = ("shown_url", "label", "enabled", "last_delivery", "created_at")
    list_filter = ("enabled",)
    actions = ("send_test",)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return permissions.can(request.user, permissions.CHANGE_SETTINGS)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return permissions.can(request.user, permissions.CHANGE_SETTINGS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return permissions.can(request.user, permissions.CHANGE_SETTINGS)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return permissions.can(request.user, permissions.CHANGE_SETTINGS)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return permissions.can(request.user, permissions.CHANGE_SETTINGS)

    def get_queryset(self, request: HttpRequest) -> QuerySet[NotificationTarget]:
        latest = NotificationDelivery.objects.filter(target=OuterRef("pk")).order_by("-created_at", "-pk")
        return (
            super()
            .get_queryset(request)
            .annotate(
                last_status=Subquery(latest.values("status")[:1]),
                last_error=Subquery(latest.values("last_error")[:1]),
            )
        )

    @admin.display(description="URL (masked)")
    def shown_url(self, target: NotificationTarget) -> str:
        return target.masked_url

    @admin.display(description="last delivery")
    def last_delivery(self, target: NotificationTarget) -> str:
        status = getattr(target, "last_status", None)
        if not status:
            return "-"
        label = NotificationDelivery.Status(status).label
        error = getattr(target, "last_error", "")
        return format_html("{} <small>{}</small>", label, error) if error else label

    @admin.action(description="Send a test message to the selected URLs", permissions=["change"])
    def send_test(self, request: HttpRequest, queryset: QuerySet[NotificationTarget]) -> None:
        for target, outcome in NotificationTarget.send_test(list(queryset.order_by("pk"))):
            if outcome.ok:
                self.message_user(request, f"Test message delivered to {target}.", messages.SUCCESS)
            else:
                self.message_user(
                    request,
                    f"Test message to {target}: {outcome.result.value}: {outcome.detail}",
                    messages.ERROR,
                )


class ReadOnlyRecords(admin.ModelAdmin):
    """Rows the portal writes: viewable by those who may see the settings or operate, never edited."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return can_see(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_see(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(NotificationEvent)
class NotificationEventAdmin(ReadOnlyRecords):
    list_display = ("created_at", "kind", "title", "where", "sent")
    list_filter = ("kind",)
    list_select_related = ("message",)
    search_fields = ("title", "key", "where")
    readonly_fields = ("deliveries",)

    @admin.display(description="message")
    def sent(self, event: NotificationEvent) -> str:
        return f"#{event.message_id}" if event.message_id else "waiting for the digest window"

    @admin.display(description="deliveries (per URL)")
    def deliveries(self, event: NotificationEvent) -> str:
        if event.message is None:
            return "not sent yet"
        rows = event.message.deliveries.order_by("pk")
        if not rows:
            return "no URL was enabled when it was sent"
        return format_html_join(
            "",
            "<div>{}: {}, {} attempt(s){}</div>",
            (
                (
                    row.target_name,
                    row.get_status_display(),
                    row.attempts,
                    f", delivered at {row.delivered_at:%Y-%m-%d %H:%M:%S}"
                    if row.delivered_at
                    else (f", last error: {row.last_error}" if row.last_error else ""),
                )
                for row in rows
            ),
        )


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(ReadOnlyRecords):
    list_display = (
        "message",
        "target_name",
        "status",
        "attempts",
        "last_error",
        "last_attempt_at",
        "next_attempt_at",
        "delivered_at",
    )
    list_filter = ("status",)
    list_select_related = ("message",)
    search_fields = ("target_name", "message__title", "last_error")
