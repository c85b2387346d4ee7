"""The Django admin: the centre of the portal. Actions call model verbs and report in a message.

Who may do what is `backends_app.permissions`' rule, as in the API and the pages: the admin lets in
staff only (Django's rule), then each action and change form asks the same permission the API asks.

Every changelist costs a fixed number of queries, whatever the number of rows: related rows come
through `list_select_related`, per-node installations through one prefetch, counts through
annotations.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.defaultfilters import filesizeformat
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join

from backends_app import permissions
from backends_app.models import (
    Backend,
    BackendQuerySet,
    Gallery,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)


def requested_by(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"


def job_link(job: UpgradeJob) -> str:
    """A link to the job's live page (progress over a websocket)."""
    return format_html('<a href="{}">#{}</a>', reverse("ui:job", args=[job.pk]), job.pk)


def short_duration(value: dt.timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = int(value.total_seconds())
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class RefuseHiddenActions(admin.ModelAdmin):
    """A posted action the user may not run is a 403, not Django's quiet "No action selected"."""

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        name = request.POST.get("action") if request.method == "POST" else None
        declared = {*(self.actions or ()), *(site_name for site_name, _ in self.admin_site.actions)}
        if name and name in declared and name not in self.get_actions(request):
            raise PermissionDenied
        return super().changelist_view(request, extra_context)


class OperateMixin(RefuseHiddenActions):
    """Backends and jobs: whoever may operate them sees them, and their actions need that permission."""

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return permissions.can(request.user, permissions.OPERATE)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_operate_permission(request) or super().has_view_permission(request, obj)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records the portal writes itself: viewable, never edited by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Gallery)
class GalleryAdmin(RefuseHiddenActions):
    list_display = ("name", "url", "enabled", "entry_count", "last_synced_at", "last_error")
    list_filter = ("enabled",)
    search_fields = ("name", "url")
    readonly_fields = ("etag", "last_synced_at", "last_attempt_at", "last_error", "entry_count")
    actions = ("sync_now",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return permissions.can(request.user, permissions.ADD_GALLERY)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return permissions.can(request.user, permissions.CHANGE_GALLERY)

    @admin.action(description="Sync selected galleries now", permissions=["change"])
    def sync_now(self, request: HttpRequest, queryset: QuerySet[Gallery]) -> None:
        for gallery in queryset:
            result = gallery.sync()
            self.message_user(request, result.summary(), messages.SUCCESS if result.ok else messages.ERROR)


class InstalledFilter(admin.SimpleListFilter):
    title = "installed"
    parameter_name = "installed"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Backend]) -> QuerySet[Backend]:
        installed = InstalledVersion.objects.filter(state=InstalledVersion.State.CURRENT).values("backend_id")
        if self.value() == "yes":
            return queryset.filter(pk__in=installed)
        if self.value() == "no":
            return queryset.exclude(pk__in=installed)
        return queryset


class NodeFilter(admin.SimpleListFilter):
    """Backends installed on one node."""

    title = "installed on node"
    parameter_name = "node"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(str(pk), name) for pk, name in Node.objects.values_list("pk", "name")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Backend]) -> QuerySet[Backend]:
        node_id = self.value()
        if not node_id:
            return queryset
        on_node = InstalledVersion.objects.filter(
            state=InstalledVersion.State.CURRENT, node_id=node_id
        ).values("backend_id")
        return queryset.filter(pk__in=on_node)


@admin.register(Backend)
class BackendAdmin(OperateMixin):
    list_display = (
        "name",
        "gallery",
        "installed_versions",
        "available",
        "state",
        "pinned",
        "last_checked_at",
        "gone",
    )
    list_filter = ("upgrade_available", InstalledFilter, "pinned", "gallery", NodeFilter, "is_meta", "gone")
    list_select_related = ("gallery",)
    search_fields = ("name", "alias", "uri")
    actions = (
        "check_now",
        "install_selected",
        "upgrade_selected",
        "rollback_selected",
        "converge_selected",
        "pin_selected",
        "unpin_selected",
    )
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

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_operate_permission(request)  # pinned and holds are the operator's decisions

    def get_urls(self) -> list[URLPattern]:
        check = self.admin_site.admin_view(self.check_now_view)
        return [path("check-now/", check, name="backends_app_backend_check_now"), *super().get_urls()]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        extra_context = {**(extra_context or {}), "can_operate": self.has_operate_permission(request)}
        return super().changelist_view(request, extra_context)

    def check_now_view(self, request: HttpRequest) -> HttpResponse:
        """The changelist's "Check for upgrades now" button: no selection needed."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_operate_permission(request):
            raise PermissionDenied
        self.check_now(request, Backend.objects.none())
        return HttpResponseRedirect(reverse("admin:backends_app_backend_changelist"))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Backend]:
        return super().get_queryset(request).with_installations()  # type: ignore[attr-defined]

    @admin.display(description="installed (per node)")
    def installed_versions(self, backend: Backend) -> str:
        rows = backend.current_versions()
        if not rows:
            return "-"
        versions = format_html_join(
            ", ",
            "{} <small>on {}</small>",
            ((row.version or row.short_digest or "?", row.node) for row in rows),
        )
        if backend.drift:
            return format_html('{} <strong title="the nodes run different builds">drift</strong>', versions)
        return versions

    @admin.display(description="available")
    def available(self, backend: Backend) -> str:
        return backend.available_version or backend.latest_digest.removeprefix("sha256:")[:12] or "-"

    @admin.display(description="status", ordering="upgrade_available")
    def state(self, backend: Backend) -> str:
        status = backend.status
        return format_html("<strong>{}</strong> <small>{}</small>", status.label, status.detail)

    # --- actions: each calls the model verb and says what happened -----------------------------

    @admin.action(description="Check for upgrades now (every installed backend)", permissions=["operate"])
    def check_now(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        job, created = UpgradeJob.request_check(requested_by=requested_by(request))
        if created:
            self.message_user(
                request, format_html("Queued upgrade check {}.", job_link(job)), messages.SUCCESS
            )
        else:
            state = "running" if job.status == JobStatus.RUNNING else "queued"
            self.message_user(
                request,
                format_html("A check is already {} as job {}.", state, job_link(job)),
                messages.WARNING,
            )

    @admin.action(description="Install selected backends", permissions=["operate"])
    def install_selected(self, request: HttpRequest, queryset: BackendQuerySet) -> None:
        self._request(request, queryset, JobKind.INSTALL)

    @admin.action(description="Upgrade selected backends", permissions=["operate"])
    def upgrade_selected(self, request: HttpRequest, queryset: BackendQuerySet) -> None:
        self._request(request, queryset, JobKind.UPGRADE)

    @admin.action(description="Roll back selected backends to their kept version", permissions=["operate"])
    def rollback_selected(self, request: HttpRequest, queryset: BackendQuerySet) -> None:
        self._request(request, queryset, JobKind.ROLLBACK)

    @admin.action(
        description="Converge selected backends (upgrade the nodes that run another build)",
        permissions=["operate"],
    )
    def converge_selected(self, request: HttpRequest, queryset: BackendQuerySet) -> None:
        self._request(request, queryset, "converge")

    @admin.action(description="Pin selected backends (no automatic upgrades)", permissions=["operate"])
    def pin_selected(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        for backend in queryset:
            backend.pin()
        self.message_user(request, f"Pinned {len(queryset)} backend(s).", messages.SUCCESS)

    @admin.action(description="Unpin selected backends", permissions=["operate"])
    def unpin_selected(self, request: HttpRequest, queryset: QuerySet[Backend]) -> None:
        for backend in queryset:
            backend.unpin()
        self.message_user(request, f"Unpinned {len(queryset)} backend(s).", messages.SUCCESS)

    def _request(self, request: HttpRequest, queryset: BackendQuerySet, kind: str) -> None:
        """Ask for `kind` on each selected backend (`Backend.request`: the local node, or a fan-out to the
        nodes in distributed mode); report what was queued, and why not."""
        outcomes = queryset.request_each(kind, requested_by=requested_by(request))
        queued = outcomes.jobs
        refused: list[str] = [str(exc) for _, exc in outcomes.refused]
        for backend, job in outcomes.already_active:
            state = "running" if job.status == JobStatus.RUNNING else "queued"
            refused.append(format_html("{}: already {} as job {}", backend.name, state, job_link(job)))
        if queued:
            links = format_html_join(", ", "{}", ((job_link(job),) for job in queued))
            self.message_user(
                request, format_html("Queued {} {} job(s): {}.", len(queued), kind, links), messages.SUCCESS
            )
        if refused:
            lead = "Not queued" if queued else f"No {kind} job queued"
            reasons = format_html_join("; ", "{}", ((reason,) for reason in refused))
            self.message_user(request, format_html("{}: {}.", lead, reasons), messages.WARNING)


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "capability",
        "platform",
        "backends_path",
        "queue",
        "is_local",
        "is_online",
        "installed_count",
        "last_heartbeat_at",
    )
    readonly_fields = ("is_local", "last_heartbeat_at", "created_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Node]:
        current = Q(installed__state=InstalledVersion.State.CURRENT)
        return super().get_queryset(request).annotate(current_count=Count("installed", filter=current))

    @admin.display(description="online", boolean=True)
    def is_online(self, node: Node) -> bool:
        return node.online

    @admin.display(description="backends installed", ordering="current_count")
    def installed_count(self, node: Node) -> int:
        return node.current_count  # type: ignore[attr-defined]


@admin.register(InstalledVersion)
class InstalledVersionAdmin(ReadOnlyAdmin):
    list_display = (
        "name",
        "node",
        "state",
        "version",
        "short_digest",
        "backend",
        "installed_at",
        "origin",
        "problem",
    )
    list_filter = ("state", "origin", "node")
    list_select_related = ("node", "backend")
    search_fields = ("name", "version", "digest")


class JobGroupFilter(admin.SimpleListFilter):
    """Active (queued or running) or finished, the named groups of JobStatus."""

    title = "active or finished"
    parameter_name = "group"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "Active"), ("finished", "Finished")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[UpgradeJob]) -> QuerySet[UpgradeJob]:
        if self.value() == "active":
            return queryset.filter(status__in=JobStatus.ACTIVE)
        if self.value() == "finished":
            return queryset.filter(status__in=JobStatus.FINISHED)
        return queryset


@admin.register(UpgradeJob)
class UpgradeJobAdmin(OperateMixin, ReadOnlyAdmin):
    list_display = (
        "id",
        "kind",
        "backend",
        "node",
        "status",
        "phase",
        "progress",
        "versions",
        "requested_by",
        "created_at",
        "how_long",
        "live_page",
    )
    list_filter = (JobGroupFilter, "status", "kind", "node")
    list_select_related = ("backend", "node")
    search_fields = ("backend__name", "message", "error", "requested_by")
    readonly_fields = ("live_page",)
    actions = ("cancel_selected",)

    @admin.display(description="progress")
    def progress(self, job: UpgradeJob) -> str:
        if job.kind == JobKind.CHECK or not job.bytes_total:
            return f"{job.percent:.0f}%"
        return f"{job.percent:.0f}% of {filesizeformat(job.bytes_total)}"

    @admin.display(description="from → to")
    def versions(self, job: UpgradeJob) -> str:
        before = job.from_version or job.from_digest.removeprefix("sha256:")[:12]
        after = job.to_version or job.to_digest.removeprefix("sha256:")[:12]
        if not before and not after:
            return "-"
        return f"{before or '-'} → {after or '…'}"

    @admin.display(description="how long")
    def how_long(self, job: UpgradeJob) -> str:
        return short_duration(job.duration)

    @admin.display(description="live page")
    def live_page(self, job: UpgradeJob) -> str:
        return format_html('<a href="{}">view</a>', reverse("ui:job", args=[job.pk]))

    @admin.action(description="Cancel selected jobs", permissions=["operate"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[UpgradeJob]) -> None:
        asked = [
            job
            for job in queryset.filter(status__in=JobStatus.ACTIVE)
            if job.cancel(by=requested_by(request))
        ]
        if asked:
            self.message_user(request, f"Cancelled or asked to stop {len(asked)} job(s).", messages.SUCCESS)
        else:
            self.message_user(request, "No selected job was queued or running.", messages.WARNING)


def _on_off(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


@admin.register(PortalSettings)
class PortalSettingsAdmin(admin.ModelAdmin):
    readonly_fields = ("last_check_at", "updated_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        fields = tuple(self.readonly_fields)
        if not permissions.can(request.user, permissions.SET_HEALTH_CHECK_COMMAND):
            fields = ("health_check_command", *fields)  # the workers run it on every node
        locked = tuple(PortalSettings.environment_locks())
        if locked:  # out of the form (a posted value is ignored), shown as the environment's
            fields = (*locked, "set_by_environment", *fields)
        return fields

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[Any]:
        locked = PortalSettings.environment_locks()
        fields = [name for name in super().get_fields(request, obj) if name not in locked]
        if locked:
            fields.remove("set_by_environment")
            fields.insert(0, "set_by_environment")
        return fields

    @admin.display(description="set by the environment")
    def set_by_environment(self, row: PortalSettings) -> str:
        return "; ".join(
            f"{name.replace('_', ' ')}: {_on_off(lock.value)}, {lock}. "
            f"The stored value ({_on_off(getattr(row, name))}) counts again once {lock.variable} is unset."
            for name, lock in PortalSettings.environment_locks().items()
        )

    def save_model(self, request: HttpRequest, obj: PortalSettings, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if obj.sharing_error:
            self.message_user(
                request, f"Saved, but not shared with LocalAI: {obj.sharing_error}", messages.WARNING
            )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return not PortalSettings.objects.exists() and self.has_change_permission(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return permissions.can(request.user, permissions.CHANGE_SETTINGS)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponseRedirect:
        row = PortalSettings.load()
        return HttpResponseRedirect(reverse("admin:backends_app_portalsettings_change", args=[row.pk]))
