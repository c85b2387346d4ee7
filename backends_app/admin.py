"""The Django admin: the centre of the portal. Actions call model verbs and report in a message.

Who may do what is `backends_app.permissions`' rule, as in the API and the pages: the admin lets in
staff only (Django's rule), then each action, button and change form asks the same permission the
API asks.

A backend's page is the operator's view of it: what it is, what runs where, what the registry
offers, the policy (pin, hold), its installed versions and latest jobs, and a button for each
operation the backend allows now. A button calls the model verb, records who did what in Django's
admin log (shown on the page), and goes to the job it queued. A job's page shows the same live
progress as the job page (one template part, one script), its log and, for a fan-out, its children.

Every changelist costs a fixed number of queries, whatever the number of rows: related rows come
through `list_select_related`, per-node installations through one prefetch, counts through
annotations.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import yaml
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import connection
from django.db.models import Count, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from backends_app import gallery as gallery_index
from backends_app import live, permissions
from backends_app.models import (
    Backend,
    BackendQuerySet,
    Gallery,
    InstalledVersion,
    JobKind,
    JobPhase,
    JobStatus,
    Node,
    OperationRefused,
    PortalSettings,
    UpgradeJob,
)
from backends_app.templatetags.portal_format import format_moment, format_size


def requested_by(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"


def job_link(job: UpgradeJob) -> str:
    """A link to the job's live page (progress over a websocket)."""
    return format_html('<a href="{}">#{}</a>', reverse("ui:job", args=[job.pk]), job.pk)


def admin_job_url(job: UpgradeJob) -> str:
    """The job's page in the admin: the same live progress, with its log and children."""
    return reverse("admin:backends_app_upgradejob_change", args=[job.pk])


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def status_badge(status: str, label: str) -> SafeString:
    return format_html('<span class="badge status status-{}">{}</span>', status, label)


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
    """Records the portal writes itself: viewable, never edited or deleted by hand (a job is the
    record of what was done; an installed version says what a node's disk holds)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class GalleryForm(forms.ModelForm):
    """The gallery's URL as the web may set it (see `gallery.check_web_url`), credentials apart."""

    forget_credentials = forms.BooleanField(
        required=False, help_text="Drop the user, password and query values kept for this URL."
    )

    class Meta:
        model = Gallery
        fields = ("name", "url", "enabled", "signature_mode", *Gallery.VERIFICATION_FIELDS.values())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["signature_mode"].required = False  # not posted: left as it is

    def clean_signature_mode(self) -> str:
        return str(self.cleaned_data.get("signature_mode") or self.instance.signature_mode)

    def clean_url(self) -> str:
        url = str(self.cleaned_data["url"]).strip()
        if "url" in self.changed_data:
            try:
                gallery_index.check_web_url(url, settings.PORTAL_GALLERY_FILE_ROOTS)
            except gallery_index.GalleryError as exc:
                raise ValidationError(str(exc)) from exc
        return url


@admin.register(Gallery)
class GalleryAdmin(RefuseHiddenActions):
    form = GalleryForm
    list_display = (
        "name",
        "url",
        "credentials",
        "enabled",
        "signatures",
        "entry_count",
        "last_synced_at",
        "last_error",
    )
    list_filter = ("enabled", "signature_mode")
    fieldsets = (
        (None, {"fields": ("name", "url", "forget_credentials", "enabled")}),
        (
            "Signatures",
            {
                "description": "LocalAI's verification block: whose Sigstore signature the images of "
                "this gallery must carry (see docs/signatures.md). Set the issuer or its regex, and "
                "the identity or its regex; both are checked when both are set.",
                "fields": ("signature_mode", *Gallery.VERIFICATION_FIELDS.values(), "strict_integrity"),
            },
        ),
        (
            "Sync",
            {
                "fields": (
                    "credentials",
                    "set_through_web",
                    "etag",
                    "last_synced_at",
                    "last_attempt_at",
                    "last_error",
                    "entry_count",
                )
            },
        ),
    )
    search_fields = ("name", "url")
    readonly_fields = (
        "credentials",
        "strict_integrity",
        "set_through_web",
        "etag",
        "last_synced_at",
        "last_attempt_at",
        "last_error",
        "entry_count",
    )
    actions = ("sync_now",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return permissions.can(request.user, permissions.ADD_GALLERY)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return permissions.can(request.user, permissions.CHANGE_GALLERY)

    @admin.display(boolean=True, description="credentials kept")
    def credentials(self, gallery: Gallery) -> bool:
        return gallery.has_credentials

    @admin.display(description="signatures", ordering="signature_mode")
    def signatures(self, gallery: Gallery) -> str:
        return gallery.signature_policy().describe()

    @admin.display(description="strict integrity")
    def strict_integrity(self, gallery: Gallery) -> str:
        if settings.PORTAL_REQUIRE_SIGNATURES:
            return (
                "on (LOCALAI_REQUIRE_BACKEND_INTEGRITY or PORTAL_REQUIRE_SIGNATURES): every install enforced"
            )
        return "off: the mode above applies"

    def save_model(self, request: HttpRequest, obj: Gallery, form: Any, change: bool) -> None:
        if "url" in form.changed_data:
            obj.set_through_web = True
        if form.cleaned_data.get("forget_credentials"):
            obj.forget_credentials()
        super().save_model(request, obj, form, change)

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


class MetaFilter(admin.SimpleListFilter):
    """Meta entries (one name, a concrete backend per capability) or concrete ones (an image)."""

    title = "meta or concrete"
    parameter_name = "kind"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("meta", "Meta"), ("concrete", "Concrete")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Backend]) -> QuerySet[Backend]:
        if self.value() in ("meta", "concrete"):
            return queryset.filter(is_meta=self.value() == "meta")
        return queryset


class HeldFilter(admin.SimpleListFilter):
    """Backends holding a version back (it failed its health check, or was rolled back from)."""

    title = "held"
    parameter_name = "held"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Backend]) -> QuerySet[Backend]:
        held = ~Q(held_version="") | ~Q(held_digest="")
        if self.value() == "yes":
            return queryset.filter(held)
        if self.value() == "no":
            return queryset.exclude(held)
        return queryset


class JSONValueFilter(admin.SimpleListFilter):
    """Entries whose JSON field `field` holds a value (a capability's key, a tag): the choices are
    the values the gallery rows hold, read in one query."""

    field = ""

    def values_of(self, stored: Any) -> list[str]:
        raise NotImplementedError

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        found: set[str] = set()
        for stored in Backend.objects.values_list(self.field, flat=True):
            found.update(value for value in self.values_of(stored) if isinstance(value, str))
        return [(value, value) for value in sorted(found)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Backend]) -> QuerySet[Backend]:
        wanted = self.value()
        if not wanted:
            return queryset
        lookup = self.database_lookup(wanted)
        if lookup is not None and connection.features.supports_json_field_contains:
            return queryset.filter(lookup)
        # Databases that cannot look inside JSON (SQLite): read the field, keep the ids that match.
        ids = [
            pk for pk, stored in queryset.values_list("pk", self.field) if wanted in self.values_of(stored)
        ]
        return queryset.filter(pk__in=ids)

    def database_lookup(self, wanted: str) -> Q | None:
        return None


class CapabilityFilter(JSONValueFilter):
    title = "capability"
    parameter_name = "capability"
    field = "capabilities"

    def values_of(self, stored: Any) -> list[str]:
        return list(stored) if isinstance(stored, dict) else []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Backend]) -> QuerySet[Backend]:
        wanted = self.value()
        return queryset.filter(capabilities__has_key=wanted) if wanted else queryset


class TagFilter(JSONValueFilter):
    title = "tag"
    parameter_name = "tag"
    field = "tags"

    def values_of(self, stored: Any) -> list[str]:
        return list(stored) if isinstance(stored, list) else []

    def database_lookup(self, wanted: str) -> Q | None:
        return Q(tags__contains=[wanted])


@dataclass
class Operation:
    """A button on a backend's page: an operation the model verbs accept for it now."""

    name: str  # the URL's word: check, install, upgrade, rollback, converge, pin, unpin, release-hold
    label: str  # what the button says, naming where it goes ("Roll back to v1 on node-a")
    node: Node | None = None
    confirm: str = ""
    queues_job: bool = True

    @property
    def key(self) -> str:
        return f"{self.name}:{self.node.pk if self.node else ''}"


OPERATION_NAMES = ("check", "install", "upgrade", "rollback", "converge", "pin", "unpin", "release-hold")


def backend_operations(backend: Backend) -> tuple[list[Operation], list[str]]:
    """The operations `backend` allows now, and why the others are not offered.

    Only what the verbs accept is offered (`Backend.request`, `converge`, `UpgradeJob.request_check`,
    `pin`, `unpin`, `release_hold`), and each button says where it goes: an upgrade names the version
    the check found, a rollback the version it restores on which node, never a "rollback" that goes
    forward (`Backend.rollback_target_on`). `backend` comes from `with_installations()`.
    """
    ops: list[Operation] = [
        Operation("check", "Check for upgrades (every installed backend)", confirm="", queues_job=True)
    ]
    notes: list[str] = []
    current = backend.current_versions()
    distributed = Node.objects.exclude(queue="").exists()
    if backend.occurrence:
        notes.append("A later duplicate of its name in the gallery: the first entry is the one installed.")
    elif not current:
        if backend.gone:
            notes.append("No longer in its gallery: it cannot be installed.")
        elif distributed and not any(node.online for node in Node.objects.exclude(queue="")):
            notes.append("No worker node is online to install on.")
        else:
            where = " on every online worker node" if distributed else ""
            ops.append(Operation("install", f"Install {backend.version or 'the latest build'}{where}"))
    else:
        held = backend.held_version or short(backend.held_digest)
        if backend.gone:
            notes.append("No longer in its gallery: it cannot be upgraded or reinstalled.")
        elif backend.pinned:
            notes.append("Pinned: unpin it to upgrade.")
        elif held:
            notes.append(f"{held} is held: release the hold to upgrade to it.")
        elif backend.upgrade_available:
            target = backend.available_version or short(backend.latest_digest)
            ops.append(
                Operation("upgrade", f"Upgrade to {target}", confirm=f"Upgrade {backend.name} to {target}?")
            )
        else:
            ops.append(
                Operation(
                    "upgrade",
                    "Reinstall (pull the image again)",
                    confirm=f"Pull {backend.name} again from {backend.uri or 'its gallery'} and swap it in?",
                )
            )
        for row in current:
            target_row = backend.rollback_target_on(row.node_id)
            if target_row is None:
                if backend.kept_versions_on(row.node_id):
                    notes.append(
                        f"On {row.node}: the version kept last is the one a rollback replaced "
                        f"({target_version(backend, row.node_id)}); rolling back would go forward."
                    )
                continue
            restored = target_row.version or short(target_row.digest)
            ops.append(
                Operation(
                    "rollback",
                    f"Roll back to {restored} on {row.node}",
                    node=row.node,
                    confirm=f"Roll {backend.name} back from {row.version or short(row.digest)} to {restored} "
                    f"on {row.node}?",
                )
            )
        if backend.drift:
            ops.append(
                Operation(
                    "converge",
                    "Converge (upgrade the nodes that run another build)",
                    confirm=f"Upgrade the nodes whose build of {backend.name} differs from the newest?",
                )
            )
    if backend.pinned:
        ops.append(Operation("unpin", "Unpin", queues_job=False))
    else:
        ops.append(Operation("pin", "Pin (no automatic upgrades)", queues_job=False))
    if backend.held_version or backend.held_digest:
        held = backend.held_version or short(backend.held_digest)
        ops.append(
            Operation(
                "release-hold",
                f"Release the hold on {held}",
                confirm=f"Release the hold on {held}? Automatic upgrades may then install it again.",
                queues_job=False,
            )
        )
    return ops, notes


def target_version(backend: Backend, node_id: int) -> str:
    kept = sorted(backend.kept_versions_on(node_id), key=lambda row: row.path)
    return (kept[-1].version or short(kept[-1].digest)) if kept else "-"


class OperatorOnlyInline(admin.TabularInline):
    """A read-only list on a backend's page, seen by whoever may see the backend."""

    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return permissions.can(request.user, permissions.OPERATE) or super().has_view_permission(request, obj)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class InstalledVersionInline(OperatorOnlyInline):
    """The backend's live version on each node, with the versions kept there for rollback."""

    model = InstalledVersion
    fk_name = "backend"
    verbose_name = "installed version"
    verbose_name_plural = "installed versions, per node"
    fields = ("node", "version", "digest_short", "kept", "installed", "origin", "problem")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[InstalledVersion]:
        return (
            super()
            .get_queryset(request)
            .filter(state=InstalledVersion.State.CURRENT)
            .select_related("node", "backend")
            .order_by("node__name")
        )

    @admin.display(description="digest")
    def digest_short(self, row: InstalledVersion) -> str:
        return format_html('<code title="{}">{}</code>', row.digest, short(row.digest)) if row.digest else "-"

    @admin.display(description="kept for rollback (in the order kept)")
    def kept(self, row: InstalledVersion) -> str:
        if row.backend is None:
            return "-"
        kept = sorted(row.backend.kept_versions_on(row.node_id), key=lambda kept_row: kept_row.path)
        if not kept:
            return "none"
        return format_html_join(
            ", ",
            '{} <span class="quiet">installed {}</span>',
            ((k.version or short(k.digest), format_moment(k.installed_at) or "?") for k in kept),
        )

    @admin.display(description="installed at")
    def installed(self, row: InstalledVersion) -> str:
        return format_moment(row.installed_at) or "-"


class LatestJobsInline(OperatorOnlyInline):
    """The backend's latest jobs (`LATEST`), each linking to its live page in the admin."""

    LATEST = 10
    model = UpgradeJob
    fk_name = "backend"
    verbose_name = "job"
    verbose_name_plural = f"latest jobs (up to {LATEST})"
    fields = ("job", "kind", "node", "job_status", "versions", "requested_by", "created", "how_long")
    readonly_fields = fields

    @admin.display(description="job")
    def job(self, job: UpgradeJob) -> str:
        return format_html('<a href="{}">#{}</a>', admin_job_url(job), job.pk)

    @admin.display(description="status")
    def job_status(self, job: UpgradeJob) -> str:
        return status_badge(job.status, job.get_status_display())

    @admin.display(description="from → to")
    def versions(self, job: UpgradeJob) -> str:
        return job_versions(job)

    @admin.display(description="created")
    def created(self, job: UpgradeJob) -> str:
        return format_moment(job.created_at)

    @admin.display(description="how long")
    def how_long(self, job: UpgradeJob) -> str:
        return short_duration(job.duration)


def job_versions(job: UpgradeJob) -> str:
    before = job.from_version or short(job.from_digest)
    after = job.to_version or short(job.to_digest)
    if not before and not after:
        return "-"
    return f"{before or '-'} → {after or '…'}"


@admin.register(Backend)
class BackendAdmin(OperateMixin):
    list_display = (
        "name",
        "gallery",
        "installed_versions",
        "available",
        "state",
        "pinned",
        "checked",
        "gone",
    )
    list_filter = (
        "gallery",
        MetaFilter,
        CapabilityFilter,
        TagFilter,
        InstalledFilter,
        "upgrade_available",
        "pinned",
        HeldFilter,
        "gone",
        NodeFilter,
    )
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
    fieldsets = (
        (
            "What it is",
            {
                "fields": (
                    "full_name",
                    "gallery",
                    "alias",
                    "description",
                    "meta_or_concrete",
                    "capabilities_table",
                    "tag_list",
                    "license",
                    "listed",
                )
            },
        ),
        ("What runs", {"fields": ("status_now", "runs_on", "drift_now")}),
        (
            "What the registry offers",
            {
                "fields": (
                    "uri",
                    "mirror_list",
                    "version",
                    "sha256",
                    "available_version",
                    "latest_digest",
                    "upgrade_reason",
                    "checked",
                    "last_error",
                    "index_entry",
                )
            },
        ),
        ("Policy", {"fields": ("pin_state", "hold", "operator_log")}),
    )
    readonly_fields = (
        "full_name",
        "gallery",
        "alias",
        "description",
        "meta_or_concrete",
        "capabilities_table",
        "tag_list",
        "license",
        "listed",
        "status_now",
        "runs_on",
        "drift_now",
        "uri",
        "mirror_list",
        "version",
        "sha256",
        "available_version",
        "latest_digest",
        "upgrade_reason",
        "checked",
        "last_error",
        "index_entry",
        "pin_state",
        "hold",
        "operator_log",
    )
    inlines = (InstalledVersionInline, LatestJobsInline)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # backends come from galleries

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Nothing on a backend is edited by hand: the gallery writes its entry, the check what the
        # registry offers, and the operator's decisions (pin, hold) are buttons with an audit trail.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a gallery sync marks a vanished entry gone; its history stays

    def get_urls(self) -> list[URLPattern]:
        check = self.admin_site.admin_view(self.check_now_view)
        operate = self.admin_site.admin_view(self.operate_view)
        return [
            path("check-now/", check, name="backends_app_backend_check_now"),
            path("<path:object_id>/operate/<str:operation>/", operate, name="backends_app_backend_operate"),
            *super().get_urls(),
        ]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        extra_context = {**(extra_context or {}), "can_operate": self.has_operate_permission(request)}
        return super().changelist_view(request, extra_context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = dict(extra_context or {})
        backend = Backend.objects.with_installations().filter(pk=object_id).first()
        if backend is not None and self.has_operate_permission(request):
            operations, notes = backend_operations(backend)
            context.update(operations=operations, operation_notes=notes, can_operate=True)
            active = [job for job in getattr(backend, "active_jobs", [])]
            context["active_jobs"] = [(job, admin_job_url(job)) for job in active]
        if backend is not None:
            context["title"] = f"Backend {backend.gallery.name}@{backend.name}"
        return super().change_view(request, object_id, form_url, context)

    def get_formset_kwargs(self, request: HttpRequest, obj: Any, inline: Any, prefix: str) -> dict[str, Any]:
        kwargs = super().get_formset_kwargs(request, obj, inline, prefix)
        if isinstance(inline, LatestJobsInline) and obj is not None:
            latest = list(obj.jobs.order_by("-id").values_list("pk", flat=True)[: LatestJobsInline.LATEST])
            kwargs["queryset"] = (
                UpgradeJob.objects.filter(pk__in=latest).select_related("node", "backend").order_by("-id")
            )
        return kwargs

    def check_now_view(self, request: HttpRequest) -> HttpResponse:
        """The changelist's "Check for upgrades now" button: no selection needed; goes to the check."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_operate_permission(request):
            raise PermissionDenied
        job = self.check_now(request, Backend.objects.none())
        return HttpResponseRedirect(admin_job_url(job))

    def operate_view(self, request: HttpRequest, object_id: str, operation: str) -> HttpResponse:
        """A button on a backend's page: do the operation if the backend allows it now, record who
        did it in the admin log, and go to the job it queued (or back to the backend)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_operate_permission(request):
            raise PermissionDenied
        if operation not in OPERATION_NAMES:
            raise Http404("no such operation")
        backend = get_object_or_404(Backend.objects.with_installations(), pk=object_id)
        page = reverse("admin:backends_app_backend_change", args=[backend.pk])
        node_id = request.POST.get("node", "")
        offered, notes = backend_operations(backend)
        chosen = next((op for op in offered if op.key == f"{operation}:{node_id}"), None)
        if chosen is None:
            said = f"Nothing done: {backend.name} does not allow {operation} now"
            said += f" ({' '.join(notes)})." if notes else "."
            self.message_user(request, said, messages.ERROR)
            return HttpResponseRedirect(page)
        by = requested_by(request)
        if not chosen.queues_job:
            said = self._decide(backend, chosen)
            self.log_change(request, backend, said)
            self.message_user(request, said, messages.SUCCESS)
            return HttpResponseRedirect(page)
        try:
            if chosen.name == "check":
                job, created = UpgradeJob.request_check(requested_by=by)
            elif chosen.name == "converge":
                job, created = backend.converge(requested_by=by)
            else:
                job, created = backend.request(JobKind(chosen.name), node=chosen.node, requested_by=by)
        except OperationRefused as exc:
            self.message_user(request, f"Not queued: {exc}", messages.ERROR)
            return HttpResponseRedirect(page)
        if created:
            said = f"{chosen.label}: queued as job #{job.pk}"
            self.log_change(request, backend, said)
            self.message_user(request, said, messages.SUCCESS)
        else:
            state = "running" if job.status == JobStatus.RUNNING else "queued"
            self.message_user(
                request, f"Already {state} as job #{job.pk}; nothing new queued.", messages.WARNING
            )
        return HttpResponseRedirect(admin_job_url(job))

    @staticmethod
    def _decide(backend: Backend, operation: Operation) -> str:
        """Pin, unpin, release the hold: the verbs, and what the admin log says of them."""
        if operation.name == "pin":
            backend.pin()
            return "Pinned: no automatic upgrades."
        if operation.name == "unpin":
            backend.unpin()
            return "Unpinned."
        held = backend.held_version or backend.held_digest
        why = backend.held_reason or "no reason given"
        said = f"Released the hold on {held} ({backend.held_digest or 'no digest'}), held because: {why}"
        backend.release_hold()
        return said

    def get_queryset(self, request: HttpRequest) -> QuerySet[Backend]:
        return super().get_queryset(request).with_installations()  # type: ignore[attr-defined]

    # --- the list's columns and the page's read-only fields -------------------------------------

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
        return format_html(
            '<strong class="state state-{}">{}</strong> <small>{}</small>',
            status.state,
            status.label,
            status.detail,
        )

    @admin.display(description="last checked", ordering="last_checked_at")
    def checked(self, backend: Backend) -> str:
        return format_moment(backend.last_checked_at) or "never"

    @admin.display(description="name")
    def full_name(self, backend: Backend) -> str:
        text = f"{backend.gallery.name}@{backend.name}"
        if backend.occurrence:
            text += f" (duplicate {backend.occurrence} of this name in its gallery)"
        return text

    @admin.display(description="kind")
    def meta_or_concrete(self, backend: Backend) -> str:
        if not backend.is_meta:
            return "concrete: one image"
        if backend.resolves_to_id and backend.resolves_to:
            target = backend.resolves_to
            return format_html(
                'meta: on this portal\'s node it means <a href="{}">{}</a>',
                reverse("admin:backends_app_backend_change", args=[target.pk]),
                target.name,
            )
        return "meta: no concrete entry for this node's capability"

    @admin.display(description="in its gallery")
    def listed(self, backend: Backend) -> str:
        if backend.gone:
            return "no: no longer in the gallery's index (kept for its history)"
        return "yes" if not backend.occurrence else "yes, as a later duplicate of its name"

    @admin.display(description="capabilities")
    def capabilities_table(self, backend: Backend) -> str:
        if not backend.capabilities:
            return "-"
        return format_html(
            '<table class="facts"><tbody>{}</tbody></table>',
            format_html_join(
                "",
                "<tr><th>{}</th><td>{}</td></tr>",
                sorted((str(key), str(value)) for key, value in backend.capabilities.items()),
            ),
        )

    @admin.display(description="tags")
    def tag_list(self, backend: Backend) -> str:
        if not backend.tags:
            return "-"
        return format_html_join(" ", '<span class="tag">{}</span>', ((tag,) for tag in backend.tags))

    @admin.display(description="mirrors")
    def mirror_list(self, backend: Backend) -> str:
        if not backend.mirrors:
            return "-"
        return format_html_join("", "<div><code>{}</code></div>", ((ref,) for ref in backend.mirrors))

    @admin.display(description="index entry (as the gallery gives it)")
    def index_entry(self, backend: Backend) -> str:
        text = yaml.safe_dump(backend.entry, sort_keys=False, allow_unicode=True, width=100)
        return format_html('<pre class="entry">{}</pre>', text)

    @admin.display(description="status")
    def status_now(self, backend: Backend) -> str:
        return self.state(backend)

    @admin.display(description="installed on")
    def runs_on(self, backend: Backend) -> str:
        rows = backend.current_versions()
        if not rows:
            return "no node"
        return format_html_join(
            ", ", "{} ({})", ((row.node, row.version or short(row.digest) or "?") for row in rows)
        )

    @admin.display(description="drift")
    def drift_now(self, backend: Backend) -> str:
        if backend.drift:
            return "yes: the nodes run different builds (Converge brings them to the newest)"
        return "no" if backend.current_versions() else "-"

    @admin.display(description="pinned")
    def pin_state(self, backend: Backend) -> str:
        return "yes: never upgraded automatically" if backend.pinned else "no"

    @admin.display(description="hold")
    def hold(self, backend: Backend) -> str:
        if not (backend.held_version or backend.held_digest):
            return "none"
        return format_html(
            '<strong>{}</strong> <code title="{}">{}</code>: {}',
            backend.held_version or "(no version)",
            backend.held_digest,
            short(backend.held_digest) or "-",
            backend.held_reason or "no reason given",
        )

    @admin.display(description="operators' actions (latest 10)")
    def operator_log(self, backend: Backend) -> str:
        entries = LogEntry.objects.filter(
            content_type=ContentType.objects.get_for_model(Backend), object_id=str(backend.pk)
        ).select_related("user")[:10]
        if not entries:
            return "none yet"
        return format_html(
            '<ul class="operator-log">{}</ul>',
            format_html_join(
                "",
                "<li><time>{}</time> {}: {}</li>",
                ((format_moment(e.action_time), e.user, e.get_change_message()) for e in entries),
            ),
        )

    # --- actions: each calls the model verb and says what happened -----------------------------

    @admin.action(description="Check for upgrades now (every installed backend)", permissions=["operate"])
    def check_now(self, request: HttpRequest, queryset: QuerySet[Backend]) -> UpgradeJob:
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
        return job

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

    # A node's backends path is where its worker writes as the portal's own user: nodes register
    # themselves (`worker --node`), and only a superuser may add, change or delete one by hand.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.is_superuser)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_superuser)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_superuser)

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
        "signed",
        "problem",
    )
    list_filter = ("state", "origin", "signature", "node")
    list_select_related = ("node", "backend")
    search_fields = ("name", "version", "digest", "signer_identity")

    @admin.display(description="signature", ordering="signature")
    def signed(self, row: InstalledVersion) -> str:
        if row.signature == InstalledVersion.Signature.VERIFIED:
            return format_html("verified <small>{} ({})</small>", row.signer_identity, row.signer_issuer)
        if row.signature == InstalledVersion.Signature.UNVERIFIED:
            return format_html("<strong>not verified</strong> <small>{}</small>", row.signature_note)
        return "-"


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
        "job_status",
        "progress",
        "versions",
        "requested_by",
        "created",
        "how_long",
    )
    list_filter = (JobGroupFilter, "status", "kind", "node")
    list_select_related = ("backend", "node")
    search_fields = ("backend__name", "message", "error", "requested_by")
    fieldsets = (
        (
            "The record",
            {
                "classes": ("collapse",),
                "fields": (
                    ("kind", "status", "phase"),
                    ("backend", "node", "parent"),
                    ("force", "canary", "cancel_requested"),
                    ("bytes_done", "bytes_total", "percent"),
                    ("from_version", "from_digest"),
                    ("to_version", "to_digest"),
                    "source",
                    "message",
                    "error",
                    "requested_by",
                    ("created_at", "started_at", "finished_at"),
                    "live_page",
                ),
            },
        ),
    )
    readonly_fields = ("live_page",)
    actions = ("cancel_selected",)

    def get_urls(self) -> list[URLPattern]:
        cancel = self.admin_site.admin_view(self.cancel_view)
        return [
            path("<path:object_id>/cancel/", cancel, name="backends_app_upgradejob_cancel"),
            *super().get_urls(),
        ]

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """The job's live state (`templates/includes/job_live.html`, kept current by job.js), its log
        and its children, above the record's fields."""
        context = dict(extra_context or {})
        job = UpgradeJob.objects.select_related("backend", "node", "parent").filter(pk=object_id).first()
        if job is not None and self.has_view_permission(request, job):
            context.update(live.page_context(job))
            context["child_link"] = "admin"
            if self.has_operate_permission(request):
                context["cancel_url"] = reverse("admin:backends_app_upgradejob_cancel", args=[job.pk])
            target = job.backend.name if job.backend else "all installed backends"
            context["title"] = f"Job #{job.pk}: {job.get_kind_display()} {target}"
        return super().change_view(request, object_id, form_url, context)

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The job page's Cancel button, in the admin: cancel, record who asked, come back here."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_operate_permission(request):
            raise PermissionDenied
        job = get_object_or_404(UpgradeJob, pk=object_id)
        if job.cancel(by=requested_by(request)):
            self.log_change(request, job, "Cancel requested.")
            self.message_user(request, f"Job #{job.pk}: cancel requested.", messages.SUCCESS)
        else:
            self.message_user(
                request, f"Job #{job.pk} is already {job.get_status_display()}.", messages.WARNING
            )
        return HttpResponseRedirect(admin_job_url(job))

    @admin.display(description="status, phase", ordering="status")
    def job_status(self, job: UpgradeJob) -> str:
        if job.phase in (JobPhase.QUEUED, JobPhase.DONE):
            return status_badge(job.status, job.get_status_display())
        return format_html(
            "{} <small>{}</small>",
            status_badge(job.status, job.get_status_display()),
            job.get_phase_display(),
        )

    @admin.display(description="progress")
    def progress(self, job: UpgradeJob) -> str:
        if job.kind == JobKind.CHECK or not job.bytes_total:
            return f"{job.percent:.0f}%"
        return f"{job.percent:.0f}% of {format_size(job.bytes_total)}"

    @admin.display(description="from → to")
    def versions(self, job: UpgradeJob) -> str:
        return job_versions(job)

    @admin.display(description="created", ordering="created_at")
    def created(self, job: UpgradeJob) -> str:
        return format_moment(job.created_at)

    @admin.display(description="how long")
    def how_long(self, job: UpgradeJob) -> str:
        return short_duration(job.duration)

    @admin.display(description="job page")
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


# The notification URLs, events and deliveries register themselves there.
from backends_app import admin_notifications  # noqa: E402, F401
