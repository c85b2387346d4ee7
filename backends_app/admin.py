"""The Django admin: the centre of the portal. Actions call model verbs and report in a message."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import reverse

from backends_app.models import Backend, Gallery, InstalledVersion, Node, PortalSettings, UpgradeJob


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records the portal writes itself: viewable, never edited by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Gallery)
class GalleryAdmin(admin.ModelAdmin):
    list_display = ("name", "url", "enabled", "entry_count", "last_synced_at", "last_error")
    list_filter = ("enabled",)
    search_fields = ("name", "url")
    readonly_fields = ("etag", "last_synced_at", "last_attempt_at", "last_error", "entry_count")
    actions = ("sync_now",)

    @admin.action(description="Sync selected galleries now")
    def sync_now(self, request: HttpRequest, queryset: QuerySet[Gallery]) -> None:
        for gallery in queryset:
            result = gallery.sync()
            self.message_user(request, result.summary(), messages.SUCCESS if result.ok else messages.ERROR)


@admin.register(Backend)
class BackendAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "gallery",
        "is_meta",
        "version",
        "upgrade_available",
        "upgrade_reason",
        "pinned",
        "last_checked_at",
        "gone",
    )
    list_filter = ("upgrade_available", "pinned", "is_meta", "gone", "gallery")
    list_select_related = ("gallery",)
    search_fields = ("name", "alias", "uri")
    readonly_fields = (
        "gallery",
        "name",
        "occurrence",
        *Backend.ENTRY_FIELDS,
        "resolves_to",
        "gone",
        "latest_digest",
        "available_version",
        "upgrade_available",
        "upgrade_reason",
        "last_checked_at",
        "last_error",
        "created_at",
        "updated_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # backends come from galleries


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("name", "capability", "platform", "backends_path", "is_local", "last_heartbeat_at")
    readonly_fields = ("is_local", "last_heartbeat_at", "created_at")


@admin.register(InstalledVersion)
class InstalledVersionAdmin(ReadOnlyAdmin):
    list_display = ("name", "node", "state", "version", "short_digest", "installed_at", "origin", "problem")
    list_filter = ("state", "origin", "node")
    list_select_related = ("node",)
    search_fields = ("name", "version", "digest")


@admin.register(UpgradeJob)
class UpgradeJobAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "kind",
        "backend",
        "node",
        "status",
        "phase",
        "percent",
        "from_version",
        "to_version",
        "requested_by",
        "created_at",
        "duration",
    )
    list_filter = ("status", "kind", "node")
    list_select_related = ("backend", "node")
    search_fields = ("backend__name", "message", "error", "requested_by")


@admin.register(PortalSettings)
class PortalSettingsAdmin(admin.ModelAdmin):
    readonly_fields = ("last_check_at", "updated_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return not PortalSettings.objects.exists()

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponseRedirect:
        row = PortalSettings.load()
        return HttpResponseRedirect(reverse("admin:backends_app_portalsettings_change", args=[row.pk]))
