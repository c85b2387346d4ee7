"""The portal's admin site: its own header, favicon and an index that is the operator's dashboard.

`PortalAdminConfig` (apps.py) makes this the default site, so `admin.register` (ours, django-q2's,
auth's) and `admin.site.urls` (portal/urls.py) use it. The dashboard answers what an operator opens
the admin for: what can be upgraded and why, what is running (live), what failed or was rolled back,
which nodes are up, when the check ran and runs next, and which gallery cannot be read. Every item
links to its object. States come from `Backend.status`, the one function deciding them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from django.contrib import admin
from django.db.models import Count, Q
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone

from backends_app import permissions
from backends_app.models import (
    Backend,
    BackendState,
    Gallery,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)
from backends_app.views import next_check_at

# How many rows each panel lists; each links to the full changelist for the rest.
PANEL_ROWS = 10
# "Recent" failures and rollbacks: this far back.
RECENT = dt.timedelta(days=7)
# Failures and rollbacks, by status, and the operators' own rollbacks.
TROUBLE = Q(
    status__in=[JobStatus.FAILED, JobStatus.ROLLED_BACK, JobStatus.INTERRUPTED, JobStatus.PARTIAL]
) | Q(kind=JobKind.ROLLBACK, status=JobStatus.SUCCEEDED)
TROUBLE_STATUSES = (JobStatus.FAILED, JobStatus.ROLLED_BACK, JobStatus.INTERRUPTED, JobStatus.PARTIAL)


@dataclass
class Dashboard:
    """What the admin's index shows; empty lists for what the user may not see."""

    upgrades: list[Backend] = field(default_factory=list)
    held_back: list[Backend] = field(default_factory=list)
    check_errors: list[Backend] = field(default_factory=list)
    running: list[UpgradeJob] = field(default_factory=list)
    trouble: list[UpgradeJob] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    galleries_failing: list[Gallery] = field(default_factory=list)
    last_check_at: dt.datetime | None = None
    last_check_job: UpgradeJob | None = None
    next_check_at: dt.datetime | None = None
    check_overdue: bool = False
    schedule_id: int | None = None
    shows_backends: bool = False
    shows_nodes: bool = False
    shows_galleries: bool = False
    shows_settings: bool = False

    @classmethod
    def for_user(cls, user: Any, *, now: dt.datetime | None = None) -> Dashboard:
        """The dashboard as `user` may see it, in a fixed number of queries."""
        now = now or timezone.now()
        board = cls()
        operator = permissions.can(user, permissions.OPERATE)
        board.shows_backends = operator or user.has_perm("backends_app.view_backend")
        board.shows_nodes = operator or user.has_perm("backends_app.view_node")
        board.shows_galleries = operator or user.has_perm("backends_app.view_gallery")
        board.shows_settings = permissions.can(user, permissions.CHANGE_SETTINGS)
        if board.shows_backends:
            board._backends()
            board._jobs(now)
        if board.shows_nodes:
            current = Q(installed__state=InstalledVersion.State.CURRENT)
            board.nodes = list(Node.objects.annotate(current_count=Count("installed", filter=current))[:50])
        if board.shows_galleries:
            board.galleries_failing = list(Gallery.objects.filter(enabled=True).exclude(last_error=""))
        if board.shows_backends or board.shows_settings:
            board._checks(now)
        return board

    def _backends(self) -> None:
        worth_a_look = (
            Q(upgrade_available=True)
            | Q(pinned=True)
            | ~Q(held_version="")
            | ~Q(held_digest="")
            | ~Q(last_error="")
        )
        candidates = Backend.objects.visible().installed_on().filter(worth_a_look).with_installations()
        for backend in candidates.order_by("name", "gallery__name"):
            state = backend.status.state
            if state == BackendState.UPGRADE_AVAILABLE:
                self.upgrades.append(backend)
            elif state in (BackendState.HELD, BackendState.PINNED):
                self.held_back.append(backend)
            elif state == BackendState.ERROR:
                self.check_errors.append(backend)

    def _jobs(self, now: dt.datetime) -> None:
        jobs = UpgradeJob.objects.select_related("backend", "node")
        self.running = list(jobs.filter(status__in=JobStatus.ACTIVE, parent=None).order_by("id")[:PANEL_ROWS])
        self.trouble = list(
            jobs.filter(TROUBLE, parent=None, created_at__gte=now - RECENT).order_by("-id")[:PANEL_ROWS]
        )

    def _checks(self, now: dt.datetime) -> None:
        from django_q.models import Schedule

        from backends_app.schedule import SCHEDULE_NAME

        stored = PortalSettings.load()
        self.last_check_job = (
            UpgradeJob.objects.filter(kind=JobKind.CHECK).order_by("-created_at", "-id").first()
        )
        # When the last check ended, whoever asked (the same record the pages show).
        self.last_check_at = stored.last_check_finished_at
        self.schedule_id = Schedule.objects.filter(name=SCHEDULE_NAME).values_list("id", flat=True).first()
        self.next_check_at = next_check_at(stored)
        self.check_overdue = bool(self.next_check_at and self.next_check_at < now - dt.timedelta(minutes=5))

    @property
    def attention_count(self) -> int:
        return len(self.held_back) + len(self.check_errors)

    @property
    def nodes_online(self) -> int:
        return sum(node.online for node in self.nodes)


class PortalAdminSite(admin.AdminSite):
    """Django's admin, as the portal's console."""

    site_header = "Backend Portal"
    site_title = "Backend Portal admin"
    index_title = "Operator's console"
    index_template = "admin/portal_index.html"
    # The lists need the width (a backend's versions per node, a job's progress); the index and the
    # breadcrumbs lead everywhere the sidebar did.
    enable_nav_sidebar = False

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
        context = {
            **(extra_context or {}),
            "dashboard": Dashboard.for_user(request.user),
            "can_operate": permissions.can(request.user, permissions.OPERATE),
            "trouble_statuses": ",".join(TROUBLE_STATUSES),
        }
        return super().index(request, context)
