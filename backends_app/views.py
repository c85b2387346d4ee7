"""The web pages: backends, one job's live progress, settings. Server-rendered, a small script each.

Reading needs a signed-in user. Changing anything needs the permission the REST API and the admin ask
for the same change (`backends_app.permissions`: `operate_backend`, `change_portalsettings`;
superusers hold them all, staff status alone none). Every change calls the model verbs the admin, the
API and the commands call; these views hold no logic of their own.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from backends_app import live, permissions
from backends_app.models import (
    Backend,
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
    """One backend installed on one node, with what the page offers for it."""

    installed: InstalledVersion
    backend: Backend | None
    has_kept: bool
    job: UpgradeJob | None
    drift: bool = False  # the nodes that have this backend run different builds
    first_of_backend: bool = True

    @property
    def node(self) -> Node:
        return self.installed.node

    @property
    def upgradable(self) -> bool:
        return bool(self.backend and self.backend.upgrade_available and not self.backend.pinned)


def installed_rows() -> list[InstalledRow]:
    """Every current installation with its backend, kept versions and active job, by name and node.

    Gallery backends come from `Backend.objects.with_installations()`; directories no gallery lists
    (adopted from disk) have rows of their own.
    """
    rows: list[InstalledRow] = []
    for backend in Backend.objects.installed_on().with_installations():
        for number, row in enumerate(backend.current_versions()):
            rows.append(
                InstalledRow(
                    installed=row,
                    backend=backend,
                    has_kept=bool(backend.kept_versions_on(row.node_id)),
                    job=backend.active_job_on(row.node_id),
                    drift=backend.drift,
                    first_of_backend=number == 0,
                )
            )
    orphans = InstalledVersion.objects.filter(state=InstalledVersion.State.CURRENT, backend=None)
    kept = set(
        InstalledVersion.objects.filter(state=InstalledVersion.State.KEPT, backend=None).values_list(
            "node_id", "name"
        )
    )
    for row in orphans.select_related("node"):
        rows.append(
            InstalledRow(installed=row, backend=None, has_kept=(row.node_id, row.name) in kept, job=None)
        )
    rows.sort(key=lambda r: (r.installed.name, r.installed.node.name))
    return rows


@require_GET
@login_required(login_url=LOGIN_URL)
def backends_page(request: HttpRequest) -> HttpResponse:
    """Installed backends with their versions and upgrades, and the gallery's others to install."""
    updates_only = request.GET.get("updates") == "1"
    search = request.GET.get("q", "").strip()
    rows = installed_rows()
    upgradable = len({row.backend.pk for row in rows if row.upgradable and row.backend})
    if updates_only:
        rows = [row for row in rows if row.backend and row.backend.upgrade_available]

    not_installed = (
        Backend.objects.visible()
        .filter(gone=False)
        .exclude(
            pk__in=InstalledVersion.objects.filter(
                state=InstalledVersion.State.CURRENT, backend__isnull=False
            ).values("backend_id")
        )
        .select_related("gallery")
        .order_by("name", "gallery__name")
    )
    if search:
        not_installed = not_installed.filter(
            Q(name__icontains=search) | Q(alias__icontains=search) | Q(description__icontains=search)
        )
    page = Paginator(not_installed, GALLERY_PAGE_SIZE).get_page(request.GET.get("page"))
    installing = {
        job.backend_id: job
        for job in UpgradeJob.objects.filter(
            status__in=JobStatus.ACTIVE, backend__in=[b.pk for b in page.object_list]
        )
    }
    gallery_rows = [(backend, installing.get(backend.pk)) for backend in page.object_list]
    check = UpgradeJob.objects.filter(kind=JobKind.CHECK, status__in=JobStatus.ACTIVE).first()
    return render(
        request,
        "backends.html",
        {
            "rows": rows,
            "upgradable": upgradable,
            "updates_only": updates_only,
            "search": search,
            "page": page,
            "gallery_rows": gallery_rows,
            "check_job": check,
            "portal_settings": PortalSettings.load(),
            "can_operate": can_operate(request.user),
            "nav": "backends",
        },
    )


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
    children = list(job.children.select_related("backend", "node").order_by("id"))
    return render(
        request,
        "job.html",
        {
            "job": job,
            "state": live.snapshot(job),
            "children": children,
            "can_operate": can_operate(request.user),
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
            saved = form.save()
            messages.success(request, "Settings saved.")
            if saved.sharing_error:
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
            "check_job": UpgradeJob.objects.filter(kind=JobKind.CHECK, status__in=JobStatus.ACTIVE).first(),
            "can_operate": can_operate(request.user),
            "time_zone": settings.TIME_ZONE,
            "locks": PortalSettings.environment_locks(),
            "runtime_settings_path": PortalSettings.runtime_settings_path(),
            "nav": "settings",
        },
    )
