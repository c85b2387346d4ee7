"""The web pages: backends, one job's live progress, settings. Server-rendered, a small script each.

Reading needs a signed-in user. Changing anything needs the permission the REST API and the admin ask
for the same change (`backends_app.permissions`: `operate_backend`, `change_portalsettings`;
superusers hold them all, staff status alone none). Every change calls the model verbs the admin, the
API and the commands call; these views hold no logic of their own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import Count, Q
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseRedirect,
    JsonResponse,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from backends_app import gallery as gallery_index
from backends_app import live, notification_views, permissions, registry
from backends_app.models import (
    Backend,
    BackendState,
    BackendStatus,
    Gallery,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    OperationRefused,
    PortalSettings,
    UpgradeJob,
)

LOGIN_URL = "ui:login"
# Gallery backends not installed, per page: LocalAI's gallery alone has about a thousand.
GALLERY_PAGE_SIZE = 25
OPERATIONS = {"install": JobKind.INSTALL, "upgrade": JobKind.UPGRADE, "rollback": JobKind.ROLLBACK}


def can_operate(user: Any) -> bool:
    return permissions.can(user, permissions.OPERATE)


def can_change_settings(user: Any) -> bool:
    return permissions.can(user, permissions.CHANGE_SETTINGS)


def requested_by(request: HttpRequest) -> str:
    return f"web:{request.user.get_username()}"


def job_link(job: UpgradeJob) -> str:
    return format_html('<a href="{}">job #{}</a>', reverse("ui:job", args=[job.pk]), job.pk)


def already_active(name: str, job: UpgradeJob) -> str:
    state = "running" if job.status == JobStatus.RUNNING else "queued"
    return format_html("{}: already {} as {}", name, state, job_link(job))


def back_to(request: HttpRequest) -> HttpResponseRedirect:
    """Back to the page the form was on (`next`), if it is one of ours; else the backends page."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        return HttpResponseRedirect(target)
    return redirect("ui:backends")


# --- the backends page ----------------------------------------------------------------------------


@dataclass
class InstalledRow:
    """One backend installed on one node, with what the page says and offers for it."""

    installed: InstalledVersion
    backend: Backend | None
    job: UpgradeJob | None
    drift: bool = False  # the nodes that have this backend run different builds
    first_of_backend: bool = True
    display_name: str = ""  # `gallery@name` when several galleries offer the name, as LocalAI says it

    @property
    def node(self) -> Node:
        return self.installed.node

    @property
    def key(self) -> str:
        """Stable across upgrades: what the live updates match rows by."""
        return f"{self.installed.node_id}:{self.installed.name}"

    @cached_property
    def status(self) -> BackendStatus | None:
        return self.backend.status if self.backend else None

    @property
    def upgradable(self) -> bool:
        return bool(self.backend and self.backend.upgrade_available and not self.backend.pinned)

    @cached_property
    def rollback_target(self) -> InstalledVersion | None:
        return self.backend.rollback_target_on(self.installed.node_id) if self.backend else None

    @property
    def offered(self) -> str:
        """What the registry offers, as a version, else a short digest; "" when not known."""
        if not self.backend:
            return ""
        return self.backend.available_version or short_digest(self.backend.latest_digest)

    @property
    def upgrade_kind(self) -> str:
        """The one upgrade button: `upgrade` (something newer), `held` (what the registry offers is
        the held build: installing it takes it anyway), or `reinstall`."""
        backend = self.backend
        if backend is None:
            return ""
        if backend.upgrade_available:
            return "upgrade"
        held = self.status is not None and self.status.state == BackendState.HELD
        if held and backend.latest_digest and backend.latest_digest != self.installed.digest:
            return "held"
        return "reinstall"


def short_digest(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def ambiguous_names(names: set[str]) -> set[str]:
    """The names among `names` that several galleries offer (one query)."""
    if not names:
        return set()
    return set(
        Backend.objects.visible()
        .filter(name__in=names)
        .order_by()
        .values("name")
        .annotate(galleries=Count("gallery", distinct=True))
        .filter(galleries__gt=1)
        .values_list("name", flat=True)
    )


def qualified(backend: Backend, ambiguous: set[str]) -> str:
    return f"{backend.gallery.name}@{backend.name}" if backend.name in ambiguous else backend.name


def installed_rows() -> list[InstalledRow]:
    """Every current installation with its backend and active job, by name and node; names are
    set by `name_rows`.

    Gallery backends come from `Backend.objects.with_installations()` (kept versions included, for
    the rollback buttons); directories no gallery lists (adopted from disk) have rows of their own.
    A fixed number of queries.
    """
    rows: list[InstalledRow] = []
    for backend in Backend.objects.installed_on().with_installations():
        for number, row in enumerate(backend.current_versions()):
            rows.append(
                InstalledRow(
                    installed=row,
                    backend=backend,
                    job=backend.active_job_on(row.node_id),
                    drift=backend.drift,
                    first_of_backend=number == 0,
                )
            )
    orphans = InstalledVersion.objects.filter(state=InstalledVersion.State.CURRENT, backend=None)
    for row in orphans.select_related("node"):
        rows.append(InstalledRow(installed=row, backend=None, job=None))
    return rows


def name_rows(rows: list[InstalledRow], gallery: list[GalleryRow]) -> None:
    """Name every row as LocalAI does: `gallery@name` where several galleries offer the name (one
    query for both tables), then sort the installed rows by name and node."""
    ambiguous = ambiguous_names(
        {row.backend.name for row in rows if row.backend} | {item.backend.name for item in gallery}
    )
    for row in rows:
        row.display_name = qualified(row.backend, ambiguous) if row.backend else row.installed.name
    for item in gallery:
        item.display_name = qualified(item.backend, ambiguous)
    rows.sort(key=lambda r: (r.installed.name, r.display_name, r.installed.node.name))


def upgradable_count(rows: list[InstalledRow]) -> int:
    """Backends "Upgrade all" takes (`Backend.objects.upgradable`), counted from the rows."""
    return len(
        {row.backend.pk for row in rows if row.backend and row.upgradable and not row.backend.occurrence}
    )


def render_rows(request: HttpRequest, rows: list[InstalledRow], next_url: str) -> list[dict[str, Any]]:
    """Each installed row as HTML (the one template the page and its live updates share), with a
    signature of what it shows so the page's script replaces only rows that changed."""
    context = {"can_operate": can_operate(request.user), "next_url": next_url}
    rendered = []
    for row in rows:
        html = render_to_string("parts/installed_row.html", {**context, "row": row}, request=request)
        # The CSRF token is masked afresh on each render: it is no change a user would see.
        signature = hashlib.sha256(CSRF_INPUT.sub("", html).encode()).hexdigest()[:16]
        rendered.append(
            {
                "key": row.key,
                "backend_id": row.backend.pk if row.backend else None,
                "name": row.display_name,
                "node": row.node.name,
                "state": row.status.state if row.status else "",
                "label": row.status.label if row.status else "",
                "detail": row.status.detail if row.status else "",
                "job": job_state(row.job) if row.job else None,
                "sig": signature,
                "html": html.replace("<tr ", f'<tr data-sig="{signature}" ', 1),
            }
        )
    return rendered


CSRF_INPUT = re.compile(r'<input type="hidden" name="csrfmiddlewaretoken" value="[^"]*">')


def job_state(job: UpgradeJob) -> dict[str, Any]:
    return {
        "id": job.pk,
        "kind": job.kind,
        "status": job.status,
        "phase": job.phase,
        "percent": job.percent,
        "url": reverse("ui:job", args=[job.pk]),
        "text": job_text(job),
    }


def job_text(job: UpgradeJob) -> str:
    """`Upgrade running 42%`: a job in a few words, for rows and screen readers."""
    text = f"{job.get_kind_display()} {job.get_status_display()}"
    if job.status == JobStatus.RUNNING and job.percent:
        text += f" {job.percent:.0f}%"
    return text


# --- the gallery list: filters, sort, paging ---------------------------------------------------------

SORTS = {
    "name": ("name", "gallery__name"),
    "-name": ("-name", "gallery__name"),
    "gallery": ("gallery__name", "position"),
}
KINDS = ("meta", "concrete")
ANY_CAPABILITY = "any"


@dataclass
class GalleryFilters:
    """What the gallery list shows: read from the query string; unknown values fall back to the
    defaults (this node's capability, every tag and kind, no development builds, by name)."""

    search: str = ""
    capability: str = ""  # "" this node's; ANY_CAPABILITY; or one of KNOWN_CAPABILITIES
    tag: str = ""
    kind: str = ""
    development: bool = False
    sort: str = "name"
    local_capability: str = "default"

    @classmethod
    def from_query(cls, query: Any, local_capability: str) -> GalleryFilters:
        capability = query.get("capability", "")
        if capability not in (ANY_CAPABILITY, *gallery_index.KNOWN_CAPABILITIES):
            capability = ""
        kind = query.get("kind", "")
        sort = query.get("sort", "name")
        return cls(
            search=query.get("q", "").strip()[:200],
            capability="" if capability == local_capability else capability,
            tag=query.get("tag", "").strip()[:100],
            kind=kind if kind in KINDS else "",
            development=query.get("dev") == "1",
            sort=sort if sort in SORTS else "name",
            local_capability=local_capability,
        )

    @property
    def effective_capability(self) -> str:
        return self.capability or self.local_capability

    @property
    def narrowed(self) -> bool:
        """Anything beyond the defaults hides entries: the page offers to clear them."""
        return bool(self.search or self.capability or self.tag or self.kind or self.development)

    def apply(self, queryset: Any) -> Any:
        if self.search:
            queryset = queryset.filter(
                Q(name__icontains=self.search)
                | Q(alias__icontains=self.search)
                | Q(description__icontains=self.search)
            )
        if self.capability != ANY_CAPABILITY:
            capability = self.effective_capability
            has_key = Q()
            for key in gallery_index.meta_keys_for(capability):
                has_key |= Q(capabilities__has_key=key)
            queryset = queryset.filter(
                (Q(is_meta=True) & has_key)
                | Q(is_meta=False, hardware__in=gallery_index.hardware_for(capability))
            )
        if self.tag:
            queryset = queryset.filter(tags__icontains=tag_text(self.tag))
        if self.kind:
            queryset = queryset.filter(is_meta=self.kind == "meta")
        if not self.development:
            queryset = queryset.exclude(name__endswith=gallery_index.DEVELOPMENT_SUFFIX)
        return queryset.order_by(*SORTS[self.sort])


def tag_text(tag: str) -> str:
    """A tag as it appears inside the stored JSON list, quotes included, so `tags__icontains`
    matches whole tags. SQLite keeps Django's JSON text (non-ASCII escaped); PostgreSQL's jsonb
    prints it back unescaped."""
    return json.dumps(tag, ensure_ascii=connection.vendor != "postgresql")


def all_tags() -> list[str]:
    """Every tag the galleries use, once each ignoring case, sorted (one query)."""
    seen: dict[str, str] = {}
    for tags in Backend.objects.visible().filter(gone=False).order_by().values_list("tags", flat=True):
        for tag in tags or []:
            if isinstance(tag, str) and tag.strip():
                seen.setdefault(tag.casefold(), tag)
    return sorted(seen.values(), key=str.casefold)


@dataclass
class GalleryRow:
    """A gallery backend not installed, with the job installing it and what installing it replaces."""

    backend: Backend
    job: UpgradeJob | None
    display_name: str
    replaces: list[InstalledVersion]

    @property
    def replaces_text(self) -> str:
        """`localai@whisper on node-a`: the installed backend an install would take the place of."""
        parts = []
        for row in self.replaces:
            owner = f"{row.backend.gallery.name}@{row.name}" if row.backend else f"{row.name} (no gallery)"
            parts.append(f"{owner} on {row.node.name}")
        return ", ".join(parts)


def gallery_rows(page_backends: list[Backend]) -> list[GalleryRow]:
    """The page's gallery backends with their active jobs and what installing each would replace
    (two queries); `name_rows` names them."""
    ids = [backend.pk for backend in page_backends]
    names = {backend.name for backend in page_backends}
    installing = {
        job.backend_id: job
        for job in UpgradeJob.objects.filter(status__in=JobStatus.ACTIVE, backend__in=ids).order_by("-id")
    }
    taken: dict[str, list[InstalledVersion]] = {}
    for row in InstalledVersion.objects.filter(
        state=InstalledVersion.State.CURRENT, name__in=names
    ).select_related("node", "backend__gallery"):
        taken.setdefault(row.name, []).append(row)
    return [
        GalleryRow(
            backend=backend,
            job=installing.get(backend.pk),
            display_name=backend.name,
            replaces=[row for row in taken.get(backend.name, []) if row.backend_id != backend.pk],
        )
        for backend in page_backends
    ]


def local_capability() -> str:
    return gallery_index.detect_capability(settings.PORTAL_CAPABILITY)


def gallery_state() -> list[dict[str, Any]]:
    """Each gallery's sync state, for the page's panel and its live updates."""
    return [
        {
            "name": gallery.name,
            "enabled": gallery.enabled,
            "entries": gallery.entry_count,
            "synced_at": gallery.last_synced_at.isoformat() if gallery.last_synced_at else None,
            "error": gallery.last_error,
            "pending": gallery.sync_pending,
            "generation": gallery.sync_generation,
        }
        for gallery in Gallery.objects.order_by("name")
    ]


def gallery_listing_key(galleries: list[dict[str, Any]]) -> list[Any]:
    """What changes when a sync has changed the galleries' list or its errors: the page reloads
    itself when this differs from what it was rendered with (see static/portal/backends.js)."""
    return [[g["name"], g["enabled"], g["generation"], g["error"]] for g in galleries]


def page_summary(stored: PortalSettings, rows: list[InstalledRow]) -> dict[str, Any]:
    """What the page's head shows and its live updates refresh: upgrades, the running check, the
    last check."""
    check = UpgradeJob.objects.filter(kind=JobKind.CHECK, status__in=JobStatus.ACTIVE).first()
    return {
        "upgradable": upgradable_count(rows),
        "check_job": job_state(check) if check else None,
        "last_check": last_check(stored),
        "settings": stored,
    }


def last_check(stored: PortalSettings) -> dict[str, Any] | None:
    if not stored.last_check_finished_at:
        return None
    return {"at": stored.last_check_finished_at.isoformat(), "by": stored.last_check_by}


@require_GET
@login_required(login_url=LOGIN_URL)
def backends_page(request: HttpRequest) -> HttpResponse:
    """Installed backends with their versions and upgrades, and the gallery's others to install."""
    updates_only = request.GET.get("updates") == "1"
    rows = installed_rows()
    capability = local_capability()
    filters = GalleryFilters.from_query(request.GET, capability)
    not_installed = filters.apply(
        Backend.objects.visible()
        .filter(gone=False)
        .exclude(
            pk__in=InstalledVersion.objects.filter(
                state=InstalledVersion.State.CURRENT, backend__isnull=False
            ).values("backend_id")
        )
        .select_related("gallery", "resolves_to")
    )
    page = Paginator(not_installed, GALLERY_PAGE_SIZE).get_page(request.GET.get("page"))
    listed = gallery_rows(list(page.object_list))
    name_rows(rows, listed)
    summary = page_summary(PortalSettings.load(), rows)
    if updates_only:
        rows = [row for row in rows if row.backend and row.backend.upgrade_available]
    galleries = gallery_state()
    return render(
        request,
        "backends.html",
        {
            "rows": rows,
            "row_html": render_rows(request, rows, request.get_full_path()),
            "upgradable": summary["upgradable"],
            "updates_only": updates_only,
            "search": filters.search,
            "filters": filters,
            "capabilities": gallery_index.KNOWN_CAPABILITIES,
            "tags": all_tags(),
            "sorts": [("name", "name, A to Z"), ("-name", "name, Z to A"), ("gallery", "gallery order")],
            "page": page,
            "gallery_rows": listed,
            "galleries": galleries,
            "gallery_errors": [g for g in galleries if g["enabled"] and g["error"]],
            "syncing": any(g["pending"] for g in galleries if g["enabled"]),
            "check_job": summary["check_job"],
            "last_check": summary["last_check"],
            "portal_settings": summary["settings"],
            "can_operate": can_operate(request.user),
            "can_sync": permissions.can(request.user, permissions.CHANGE_GALLERY),
            "next_url": request.get_full_path(),
            "live_state": {
                "active": bool(summary["check_job"]) or any(r.job for r in rows),
                "galleries": gallery_listing_key(galleries),
            },
            "nav": "backends",
        },
    )


@require_GET
@login_required(login_url=LOGIN_URL)
def backends_live(request: HttpRequest) -> JsonResponse:
    """What the backends page shows that changes while jobs run, for its script to poll: each
    installed row (state, job, and its HTML), every active job, the galleries' sync state, the
    head's counts. `updates=1` as on the page; `next` the page's own address (the rows' forms
    return there)."""
    next_url = request.GET.get("next", "")
    if not url_has_allowed_host_and_scheme(next_url, {request.get_host()}) or not next_url.startswith("/"):
        next_url = reverse("ui:backends")
    rows = installed_rows()
    name_rows(rows, [])
    summary = page_summary(PortalSettings.load(), rows)
    if request.GET.get("updates") == "1":
        rows = [row for row in rows if row.backend and row.backend.upgrade_available]
    jobs = [
        {**job_state(job), "backend_id": job.backend_id, "node": job.node.name if job.node else None}
        for job in UpgradeJob.objects.filter(status__in=JobStatus.ACTIVE)
        .exclude(kind=JobKind.CHECK)
        .select_related("node")
        .order_by("id")[:500]
    ]
    galleries = gallery_state()
    return JsonResponse(
        {
            "rows": render_rows(request, rows, next_url),
            "jobs": jobs,
            "galleries": galleries,
            "galleries_key": gallery_listing_key(galleries),
            "upgradable": summary["upgradable"],
            "check_job": summary["check_job"],
            "last_check": summary["last_check"],
            "active": bool(jobs) or summary["check_job"] is not None or any(g["pending"] for g in galleries),
        }
    )


@require_POST
@login_required(login_url=LOGIN_URL)
def sync_galleries(request: HttpRequest) -> HttpResponse:
    """Ask the workers to sync every enabled gallery now (the admin's "sync now", for all)."""
    if not permissions.can(request.user, permissions.CHANGE_GALLERY):
        raise PermissionDenied
    names = Gallery.objects.filter(enabled=True).request_sync()
    if names:
        messages.info(request, f"Syncing {', '.join(names)}: the list fills in when the workers are done.")
    else:
        messages.warning(request, "No gallery is enabled: add one in the admin.")
    return back_to(request)


@require_POST
@login_required(login_url=LOGIN_URL)
def operate(request: HttpRequest, pk: int, operation: str) -> HttpResponse:
    """Install, upgrade (or reinstall), roll back or converge a backend, then show its job.

    With a node (the installed rows' buttons): on that node. Without (Install): `Backend.request`
    picks, the local node or, in distributed mode, a fan-out to the worker nodes.
    """
    if operation not in (*OPERATIONS, "converge"):
        raise Http404("no such operation")
    if not can_operate(request.user):
        raise PermissionDenied
    backend = get_object_or_404(Backend, pk=pk)
    node = None
    if request.POST.get("node"):
        try:
            node = Node.objects.get(pk=int(request.POST["node"]))
        except (ValueError, Node.DoesNotExist):
            return HttpResponseBadRequest("no such node")
    try:
        if operation == "converge":
            job, created = backend.converge(requested_by=requested_by(request))
        else:
            job, created = backend.request(
                OPERATIONS[operation], node=node, requested_by=requested_by(request)
            )
    except OperationRefused as exc:
        messages.error(request, str(exc))
        return back_to(request)
    if not created:
        messages.info(request, already_active(backend.name, job))
    return redirect("ui:job", pk=job.pk)


@require_POST
@login_required(login_url=LOGIN_URL)
def upgrade_all(request: HttpRequest) -> HttpResponse:
    """Upgrade every installed backend the last check flagged and nobody pinned (as the API's apply)."""
    if not can_operate(request.user):
        raise PermissionDenied
    outcomes = (
        Backend.objects.upgradable()
        .order_by("name")
        .request_each(JobKind.UPGRADE, requested_by=requested_by(request))
    )
    queued = outcomes.jobs
    notes = [str(exc) for _, exc in outcomes.refused]
    notes += [already_active(backend.name, job) for backend, job in outcomes.already_active]
    if queued:
        links = format_html_join(", ", "{}", ((job_link(job),) for job in queued))
        messages.success(request, format_html("Queued {} upgrade(s): {}.", len(queued), links))
    elif not notes:
        messages.info(request, "No backend has an upgrade to apply.")
    for note in notes:
        messages.warning(request, note)
    return back_to(request)


@require_POST
@login_required(login_url=LOGIN_URL)
def check_now(request: HttpRequest) -> HttpResponse:
    """Look for upgrades of every installed backend now, and show the check's job."""
    if not can_operate(request.user):
        raise PermissionDenied
    job, created = UpgradeJob.request_check(requested_by=requested_by(request))
    if not created:
        messages.info(request, already_active("The upgrade check", job))
    return redirect("ui:job", pk=job.pk)


# --- one job --------------------------------------------------------------------------------------


@require_GET
@login_required(login_url=LOGIN_URL)
def job_page(request: HttpRequest, pk: int) -> HttpResponse:
    """A job's phase, progress and outcome, kept current through the websocket `/ws/jobs/<id>/`."""
    job = get_object_or_404(UpgradeJob.objects.select_related("backend", "node", "parent"), pk=pk)
    operator = can_operate(request.user)
    return render(
        request,
        "job.html",
        {
            **live.page_context(job),
            "can_operate": operator,
            "cancel_url": reverse("ui:cancel-job", args=[job.pk]) if operator else "",
            "child_link": "page",
        },
    )


@require_POST
@login_required(login_url=LOGIN_URL)
def cancel_job(request: HttpRequest, pk: int) -> HttpResponse:
    if not can_operate(request.user):
        raise PermissionDenied
    job = get_object_or_404(UpgradeJob, pk=pk)
    if job.cancel(by=requested_by(request)):
        messages.info(request, f"Job #{job.pk}: cancel requested.")
    else:
        messages.warning(request, f"Job #{job.pk} is already {job.get_status_display()}.")
    return redirect("ui:job", pk=job.pk)


# --- settings -------------------------------------------------------------------------------------


class PortalSettingsForm(forms.ModelForm):
    """The settings an operator changes here. The model's validators and its `clean` (a window has both
    ends or neither) decide, as in the admin and the API."""

    class Meta:
        model = PortalSettings
        fields = [
            "auto_upgrade_backends",
            "check_interval_minutes",
            "maintenance_window_start",
            "maintenance_window_end",
            "versions_kept",
        ]
        labels = {
            "auto_upgrade_backends": "Upgrade automatically",
            "check_interval_minutes": "Check every (minutes)",
            "maintenance_window_start": "From",
            "maintenance_window_end": "Until",
            "versions_kept": "Versions kept for rollback",
        }
        widgets = {
            "maintenance_window_start": forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
            "maintenance_window_end": forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in PortalSettings.environment_locks():  # the environment decides them: not editable
            self.fields.pop(name, None)


def next_check_at(portal_settings: PortalSettings) -> dt.datetime | None:
    """When the periodic check runs next: its django-q2 schedule, else the last check plus the interval."""
    from django_q.models import Schedule

    from backends_app.schedule import SCHEDULE_NAME

    scheduled = Schedule.objects.filter(name=SCHEDULE_NAME).values_list("next_run", flat=True).first()
    if scheduled:
        return scheduled
    if portal_settings.last_check_at:
        return portal_settings.last_check_at + portal_settings.check_interval
    return None


@require_http_methods(["GET", "POST"])
@login_required(login_url=LOGIN_URL)
def settings_page(request: HttpRequest) -> HttpResponse:
    """Auto-upgrade, check interval, maintenance window, versions kept; when checks ran and will run."""
    if not can_change_settings(request.user):
        raise PermissionDenied
    stored = PortalSettings.load()
    data = request.POST if request.method == "POST" else None
    form = PortalSettingsForm(data, instance=PortalSettings.load())
    if request.method == "POST":
        if form.is_valid():
            # Only the form's fields: a check finishing meanwhile records itself on the same row.
            saved = form.save(commit=False)
            saved.save(update_fields=[*form.Meta.fields, "updated_at"])
            messages.success(request, "Settings saved.")
            if getattr(saved, "sharing_error", ""):
                messages.warning(request, f"They could not be shared with LocalAI: {saved.sharing_error}")
            return redirect("ui:settings")
        messages.error(request, "Nothing was saved: correct the fields marked below.")
    return render(
        request,
        "settings.html",
        {
            "form": form,
            "stored": stored,
            "next_check_at": next_check_at(stored),
            "last_check": last_check(stored),
            "check_job": UpgradeJob.objects.filter(kind=JobKind.CHECK, status__in=JobStatus.ACTIVE).first(),
            "can_operate": can_operate(request.user),
            "time_zone": settings.TIME_ZONE,
            "notifications": notification_views.card(request.user),
            "galleries": Gallery.objects.order_by("name"),
            "trust_root": registry.trust_root_source(),
            "strict_signatures": settings.PORTAL_REQUIRE_SIGNATURES,
            "locks": PortalSettings.environment_locks(),
            "runtime_settings_path": PortalSettings.runtime_settings_path(),
            "nav": "settings",
        },
    )
