"""The portal's records: galleries and their backends, nodes, installed versions, jobs, settings.

State changes are verbs on these models (`gallery.sync()`, `job.start()`, `backend.pin()`); the admin,
the API, the commands and the tasks call the same verbs.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import IntegrityError, connection, models, transaction
from django.db.models import Prefetch, Q
from django.dispatch import Signal
from django.utils import timezone

from backends_app import gallery as gallery_index
from backends_app import runtime_settings

log = logging.getLogger(__name__)

#: Sent after a job's row changed (`job` the instance, `fields` the names written). The live pages
#: subscribe in `BackendsAppConfig.ready`; the models never import an entry point.
job_changed = Signal()

# A node is online while its heartbeat is younger than this.
HEARTBEAT_TIMEOUT = dt.timedelta(seconds=90)


class OperationRefused(Exception):
    """An operation that cannot be queued as asked; `reason` says why in one word for programs:
    pinned, not_installed, nothing_kept, gone, duplicate, busy, no_nodes."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class Gallery(models.Model):
    """A LocalAI backend gallery index the portal follows."""

    name = models.SlugField(max_length=100, unique=True)
    url = models.CharField(
        max_length=1000, help_text="https://..., file:///path or github:owner/repo/path@branch"
    )
    enabled = models.BooleanField(default=True)
    etag = models.CharField(max_length=500, blank=True, editable=False)
    last_synced_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_attempt_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    entry_count = models.PositiveIntegerField(default=0, editable=False)

    class Meta:
        verbose_name_plural = "galleries"
        ordering: ClassVar = ["name"]

    def __str__(self) -> str:
        return self.name

    def sync(self, *, force: bool = False) -> SyncResult:
        """Fetch and store the index. A failure changes no backend and is recorded on the gallery.

        `force` ignores the stored ETag, so the index is fetched and compared again.
        """
        now = timezone.now()
        try:
            fetched = gallery_index.fetch(
                self.url, etag="" if force else self.etag, timeout=settings.PORTAL_GALLERY_TIMEOUT
            )
            entries = None if fetched.not_modified else gallery_index.parse(fetched.text or "", self.url)
        except gallery_index.GalleryError as exc:
            Gallery.objects.filter(pk=self.pk).update(last_attempt_at=now, last_error=str(exc))
            self.refresh_from_db()
            return SyncResult(gallery=self.name, error=str(exc))
        if entries is None:
            Gallery.objects.filter(pk=self.pk).update(last_attempt_at=now, last_synced_at=now, last_error="")
            self.refresh_from_db()
            return SyncResult(gallery=self.name, not_modified=True, total=self.entry_count)
        with transaction.atomic():
            result = Backend.objects.store_entries(self, entries)
            self.etag = fetched.etag
            self.last_synced_at = self.last_attempt_at = now
            self.last_error = ""
            self.entry_count = len(entries)
            self.save(
                update_fields=["etag", "last_synced_at", "last_attempt_at", "last_error", "entry_count"]
            )
        return result


@dataclass
class SyncResult:
    """What one gallery sync did, for commands, tasks and messages."""

    gallery: str
    error: str = ""
    not_modified: bool = False
    total: int = 0
    created: int = 0
    updated: int = 0
    gone: int = 0
    duplicates: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error

    def summary(self) -> str:
        if self.error:
            return f"{self.gallery}: sync failed: {self.error}"
        if self.not_modified:
            return f"{self.gallery}: not modified since the last sync ({self.total} entries)"
        text = (
            f"{self.gallery}: {self.total} entries, {self.created} new, {self.updated} changed, "
            f"{self.gone} gone"
        )
        if self.duplicates:
            text += f"; duplicated names (first wins): {', '.join(sorted(set(self.duplicates)))}"
        return text


@dataclass
class RequestOutcomes:
    """What asking for one operation on several backends did (`BackendQuerySet.request_each`)."""

    kind: str
    jobs: list[UpgradeJob] = field(default_factory=list)
    """The jobs made for this request (queued, or already run when the caller ran them)."""
    already_active: list[tuple[Backend, UpgradeJob]] = field(default_factory=list)
    """Backends busy with another job on that node, and that job: nothing new was made."""
    refused: list[tuple[Backend, OperationRefused]] = field(default_factory=list)
    """Backends the operation cannot be done on as asked, and why."""


class BackendQuerySet(models.QuerySet["Backend"]):
    def visible(self) -> BackendQuerySet:
        """Entries that name lookups see: not a later duplicate of a name."""
        return self.filter(occurrence=0)

    def installed_on(self, node: Node | None = None) -> BackendQuerySet:
        current = InstalledVersion.State.CURRENT
        if node is None:
            return self.filter(installed__state=current).distinct()
        return self.filter(installed__state=current, installed__node=node).distinct()

    def upgradable(self, node: Node | None = None) -> BackendQuerySet:
        """Installed (on `node`, default any), flagged by the last check and not pinned (the check
        never flags a held target): what "upgrade everything" takes."""
        return self.visible().installed_on(node).filter(upgrade_available=True, pinned=False)

    def with_installations(self) -> BackendQuerySet:
        """With each backend's gallery, installed rows (node, state, newest first) and active jobs:
        what the API, the pages and the commands show, in a fixed number of queries."""
        return self.select_related("gallery").prefetch_related(
            Prefetch(
                "installed",
                queryset=InstalledVersion.objects.select_related("node").order_by(
                    "node__name", "state", "-installed_at"
                ),
            ),
            Prefetch(
                "jobs",
                queryset=UpgradeJob.objects.filter(status__in=JobStatus.ACTIVE).order_by("-id"),
                to_attr="active_jobs",
            ),
        )

    def request_each(
        self,
        kind: str,
        *,
        node: Node | None = None,
        requested_by: str = "",
        force: bool = False,
        run: Callable[[UpgradeJob], UpgradeJob] | None = None,
    ) -> RequestOutcomes:
        """Ask for `kind` (or ``"converge"``) on each backend, as `Backend.request` does, and sort
        what happened: new jobs, jobs already active, refusals.

        With `run`, each new job is handed to it (the caller runs it in this process, as the
        commands do) instead of to the workers, before the next backend is asked.
        """
        outcomes = RequestOutcomes(kind=kind)
        for backend in self:
            try:
                if kind == "converge":
                    job, created = backend.converge(requested_by=requested_by)
                else:
                    job, created = backend.request(
                        kind, node=node, requested_by=requested_by, force=force, queue=run is None
                    )
            except OperationRefused as exc:
                outcomes.refused.append((backend, exc))
                continue
            if not created:
                outcomes.already_active.append((backend, job))
                continue
            outcomes.jobs.append(run(job) if run is not None else job)
        return outcomes

    def lookup(self, name: str) -> Backend:
        """A backend by gallery name, or `gallery@name` where two galleries share one.

        Raises Backend.DoesNotExist, or Backend.MultipleObjectsReturned when the name is ambiguous.
        """
        gallery_name, _, backend_name = name.rpartition("@")
        candidates = self.visible().filter(name=backend_name)
        if gallery_name:
            candidates = candidates.filter(gallery__name=gallery_name)
        found = list(candidates.select_related("gallery")[:2])
        if not found:
            raise Backend.DoesNotExist(f"no backend named {name!r} in any gallery")
        if len(found) > 1:
            galleries = ", ".join(f"{b.gallery.name}@{b.name}" for b in found)
            raise Backend.MultipleObjectsReturned(f"{name!r} is in several galleries; say which: {galleries}")
        return found[0]


class BackendManager(models.Manager.from_queryset(BackendQuerySet)):  # type: ignore[misc]
    def store_entries(self, source: Gallery, entries: list[gallery_index.GalleryEntry]) -> SyncResult:
        """Store a parsed index: create new rows, update changed ones, mark vanished ones gone.

        A name's first occurrence wins (as LocalAI's lookup does); later duplicates are kept as rows
        with `occurrence` > 0 so the index is stored whole. Rows are compared field by field, so
        storing the same index twice writes nothing.
        """
        result = SyncResult(gallery=source.name, total=len(entries))
        existing = {(b.name, b.occurrence): b for b in self.filter(gallery=source)}
        seen: dict[str, int] = {}
        to_create: list[Backend] = []
        to_update: list[Backend] = []
        for entry in entries:
            occurrence = seen.get(entry.name, 0)
            seen[entry.name] = occurrence + 1
            if occurrence:
                result.duplicates.append(entry.name)
            values = Backend.values_from_entry(entry)
            row = existing.pop((entry.name, occurrence), None)
            if row is None:
                to_create.append(Backend(gallery=source, name=entry.name, occurrence=occurrence, **values))
                continue
            changed = [key for key, value in values.items() if getattr(row, key) != value]
            if row.gone:
                changed.append("gone")
                row.gone = False
            if changed:
                for key in changed:
                    if key != "gone":
                        setattr(row, key, values[key])
                to_update.append(row)
        self.bulk_create(to_create, batch_size=500)
        if to_update:
            self.bulk_update(to_update, [*Backend.ENTRY_FIELDS, "gone", "updated_at"], batch_size=500)
        vanished = [row.pk for row in existing.values() if not row.gone]
        if vanished:
            self.filter(pk__in=vanished).update(gone=True, updated_at=timezone.now())
        result.created, result.updated, result.gone = len(to_create), len(to_update), len(vanished)
        self._link_meta_backends(source)
        return result

    def _link_meta_backends(self, source: Gallery) -> None:
        """Point each meta entry at the concrete entry for this machine's capability."""
        capability = gallery_index.detect_capability(settings.PORTAL_CAPABILITY)
        rows = list(self.visible().filter(gallery=source))
        by_name = {row.name: row for row in rows}
        changed = []
        for row in rows:
            target = by_name.get(row.concrete_name_for(capability)) if row.is_meta else None
            if row.resolves_to_id != (target.pk if target else None):
                row.resolves_to = target
                changed.append(row)
        if changed:
            self.bulk_update(changed, ["resolves_to"], batch_size=500)


class BackendState(models.TextChoices):
    """What an operator needs to know first about a backend; `Backend.status` decides it."""

    NOT_INSTALLED = "not_installed", "not installed"
    HELD = "held", "held"
    PINNED = "pinned", "pinned"
    UPGRADE_AVAILABLE = "upgrade_available", "upgrade available"
    ERROR = "error", "check failed"
    NOT_CHECKED = "not_checked", "not checked yet"
    UP_TO_DATE = "up_to_date", "up to date"


@dataclass(frozen=True)
class BackendStatus:
    """A backend's state with its reason, as every page, the admin, the API and the commands say it."""

    state: str
    detail: str = ""

    @property
    def label(self) -> str:
        return BackendState(self.state).label

    def __str__(self) -> str:
        return f"{self.label}: {self.detail}" if self.detail else self.label


class Backend(models.Model):
    """One entry of a gallery index: a concrete backend (an OCI image) or a meta backend."""

    # Fields that come from the gallery entry itself; a sync rewrites exactly these.
    ENTRY_FIELDS: ClassVar = [
        "is_meta",
        "uri",
        "mirrors",
        "version",
        "alias",
        "capabilities",
        "description",
        "tags",
        "sha256",
        "license",
        "icon",
        "health_check",
        "position",
        "entry",
    ]

    gallery = models.ForeignKey(Gallery, on_delete=models.PROTECT, related_name="backends")
    name = models.CharField(max_length=255, db_index=True)
    occurrence = models.PositiveIntegerField(
        default=0, help_text="0 for a name's first entry in the index; later duplicates count up."
    )
    position = models.PositiveIntegerField(default=0, help_text="Index of the entry in the gallery file.")
    is_meta = models.BooleanField(default=False)
    uri = models.CharField(max_length=1000, blank=True)
    mirrors = models.JSONField(default=list, blank=True)
    version = models.CharField("declared version", max_length=200, blank=True)
    alias = models.CharField(max_length=255, blank=True)
    capabilities = models.JSONField(default=dict, blank=True)
    description = models.TextField(blank=True)
    tags = models.JSONField(default=list, blank=True)
    sha256 = models.CharField(max_length=100, blank=True)
    license = models.CharField(max_length=200, blank=True)
    icon = models.CharField(max_length=1000, blank=True)
    health_check = models.JSONField(default=dict, blank=True)
    entry = models.JSONField(default=dict, blank=True, help_text="The whole entry as the index gives it.")
    resolves_to = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="For a meta backend: the concrete entry for the local node's capability.",
    )
    gone = models.BooleanField(default=False, help_text="No longer in the gallery index.")

    # Filled by the upgrade check.
    latest_digest = models.CharField(max_length=100, blank=True)
    available_version = models.CharField(max_length=200, blank=True)
    upgrade_available = models.BooleanField(default=False, db_index=True)
    upgrade_reason = models.CharField(max_length=500, blank=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    # Operator's decisions.
    pinned = models.BooleanField(default=False, help_text="Never upgraded automatically.")
    held_version = models.CharField(max_length=200, blank=True, help_text="A version that failed its check.")
    held_digest = models.CharField(max_length=100, blank=True, help_text="A digest that failed its check.")
    held_reason = models.CharField(max_length=500, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = BackendManager()

    class Meta:
        ordering: ClassVar = ["gallery__name", "name", "occurrence"]
        permissions: ClassVar = [
            ("operate_backend", "Can install, upgrade, roll back, uninstall, pin and check backends"),
        ]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["gallery", "name", "occurrence"], name="backend_unique_entry"),
        ]

    def __str__(self) -> str:
        return self.name if not self.occurrence else f"{self.name} (duplicate {self.occurrence})"

    @property
    def status(self) -> BackendStatus:
        """The one answer to "what state is this backend in?", first match wins:

        not installed; held (a target that failed, or was rolled back from, and is still what the
        registry offers); pinned (never upgraded automatically; says what is available); upgrade
        available (with the check's reason); error (the last check could not decide); not checked
        yet; up to date. Uses the installed rows `with_installations` prefetches.
        """
        if not self.current_versions():
            return BackendStatus(BackendState.NOT_INSTALLED, "gone from its gallery" if self.gone else "")
        if self.held_version or self.held_digest:
            held = self.held_version or self.held_digest.removeprefix("sha256:")[:12]
            return BackendStatus(BackendState.HELD, f"{held}: {self.held_reason or 'marked bad'}")
        if self.pinned:
            offered = self.upgrade_reason.removeprefix("pinned: ") if self.upgrade_reason else ""
            return BackendStatus(
                BackendState.PINNED, f"not upgraded automatically; {offered or 'nothing newer known'}"
            )
        if self.upgrade_available:
            return BackendStatus(BackendState.UPGRADE_AVAILABLE, self.upgrade_reason)
        if self.last_error:
            return BackendStatus(BackendState.ERROR, self.last_error)
        if self.last_checked_at is None:
            return BackendStatus(BackendState.NOT_CHECKED)
        return BackendStatus(BackendState.UP_TO_DATE)

    @property
    def is_development(self) -> bool:
        return self.name.endswith("-development")

    @property
    def reference_chain(self) -> list[str]:
        """The image references to try, in order: the uri, then the mirrors."""
        return [ref for ref in [self.uri, *self.mirrors] if ref]

    def concrete_name_for(self, capability: str) -> str:
        """The concrete entry a meta backend resolves to; unknown capabilities take `default` (as LocalAI)."""
        key = capability if capability in self.capabilities else "default"
        return self.capabilities.get(key) or ""

    @staticmethod
    def values_from_entry(entry: gallery_index.GalleryEntry) -> dict[str, Any]:
        return {
            "is_meta": entry.is_meta,
            "uri": entry.uri,
            "mirrors": list(entry.mirrors),
            "version": entry.version,
            "alias": entry.alias,
            "capabilities": dict(entry.capabilities),
            "description": entry.description,
            "tags": list(entry.tags),
            "sha256": entry.sha256,
            "license": entry.license,
            "icon": entry.icon,
            "health_check": dict(entry.health_check or {}),
            "position": entry.position,
            "entry": entry.raw,
        }

    def pin(self) -> None:
        self.pinned = True
        self.save(update_fields=["pinned", "updated_at"])

    def unpin(self) -> None:
        self.pinned = False
        self.save(update_fields=["pinned", "updated_at"])

    def hold(self, *, version: str, digest: str, reason: str) -> None:
        """Mark a target as bad so automatic upgrades skip it until something newer appears."""
        self.held_version, self.held_digest, self.held_reason = version, digest, reason
        self.save(update_fields=["held_version", "held_digest", "held_reason", "updated_at"])

    def release_hold(self) -> None:
        self.hold(version="", digest="", reason="")

    def request(
        self,
        kind: str,
        *,
        node: Node | None = None,
        requested_by: str = "",
        force: bool = False,
        queue: bool = True,
    ) -> tuple[UpgradeJob, bool]:
        """Ask for an operation where it belongs: the way the admin, the API, the pages and the
        commands ask for one.

        On a named node: that node (`request_on_node`). In distributed mode (nodes served by their
        own workers): a fan-out to every node that has the backend, or for an install to every
        online worker node (`fan_out`). Otherwise: the local node. Returns (job, created); `queue`
        False leaves a new single-node job for the caller to run.
        """
        if node is not None or not Node.objects.exclude(queue="").exists():
            return self.request_on_node(
                node or Node.local(), kind, requested_by=requested_by, force=force, queue=queue
            )
        nodes = None
        if kind == JobKind.INSTALL:
            nodes = [n for n in Node.objects.exclude(queue="") if n.online]
        return self.fan_out(kind, nodes=nodes, requested_by=requested_by, force=force)

    def current_versions(self) -> list[InstalledVersion]:
        """This backend's live version on each node (`with_installations` saves the query)."""
        return [row for row in self.installed.all() if row.state == InstalledVersion.State.CURRENT]

    def kept_versions_on(self, node_id: int) -> list[InstalledVersion]:
        """The versions kept for rollback on a node (`with_installations` saves the query)."""
        return [
            row
            for row in self.installed.all()
            if row.state == InstalledVersion.State.KEPT and row.node_id == node_id
        ]

    def active_job_on(self, node_id: int | None) -> UpgradeJob | None:
        """The queued or running job of this backend on a node (None: a fan-out parent), if any.

        Reads `active_jobs` when `with_installations` prefetched it.
        """
        jobs = getattr(self, "active_jobs", None)
        if jobs is None:
            on_node = Q(node__isnull=True) if node_id is None else Q(node_id=node_id)
            return UpgradeJob.objects.filter(on_node, backend=self, status__in=JobStatus.ACTIVE).first()
        return next((job for job in jobs if job.node_id == node_id), None)

    @property
    def drift(self) -> bool:
        """True when the nodes that have this backend do not all run the same build."""
        return len({row.digest or row.version for row in self.current_versions()}) > 1

    def fan_out(
        self,
        kind: str,
        *,
        nodes: list[Node] | None = None,
        requested_by: str = "",
        force: bool = False,
        canary: bool = False,
    ) -> tuple[UpgradeJob, bool]:
        """Fan an operation out: one parent job, one child job per node (default: every node that has
        this backend; for an install, the nodes given). Each node pulls and swaps on its own disk.

        Returns (parent, created); an active fan-out of this backend comes back instead of a second.
        With `canary`, the first node goes alone and the others follow only if it succeeds.
        """
        with transaction.atomic():
            Backend.objects.select_for_update().filter(pk=self.pk).first()
            active = UpgradeJob.objects.filter(backend=self, node=None, status__in=JobStatus.ACTIVE).first()
            if active:
                return active, False
            if nodes is None:
                nodes = list(
                    Node.objects.filter(
                        installed__backend=self, installed__state=InstalledVersion.State.CURRENT
                    )
                    .distinct()
                    .order_by("name")
                )
            if not nodes:
                raise OperationRefused(
                    f"{self.name} is not installed on any node; name the nodes to install on"
                )
            parent = UpgradeJob.objects.create(
                kind=kind,
                backend=self,
                status=JobStatus.RUNNING,
                started_at=timezone.now(),
                requested_by=requested_by,
                force=force,
                canary=canary,
            )
            children, skipped = [], []
            for node in nodes:
                try:
                    child, created = self.request_on_node(
                        node, kind, requested_by=requested_by, force=force, queue=False, parent=parent
                    )
                except OperationRefused as exc:
                    skipped.append(f"{node.name}: {exc}")
                    continue
                if created:
                    children.append(child)
                else:
                    skipped.append(f"{node.name}: busy with job {child.pk}")
            if not children:
                raise OperationRefused("; ".join(skipped) or "nothing to do", "busy")
            parent._update(message="; ".join(f"skipped {line}" for line in skipped))
            for child in children[:1] if canary else children:
                child.enqueue()
        return parent, True

    def converge(self, requested_by: str = "") -> tuple[UpgradeJob, bool]:
        """Upgrade the nodes whose build differs from the newest one known, so all nodes agree.

        The target is the digest the last check found, else the build installed most recently. A
        backend installed on no node has nothing to converge: refused (`not_installed`).
        """
        rows = self.current_versions()
        if not rows:
            raise OperationRefused(f"{self.name} is not installed on any node", "not_installed")
        target = (
            self.latest_digest
            or max(rows, key=lambda r: r.installed_at or timezone.now() - dt.timedelta(days=36500)).digest
        )
        lagging = [row.node for row in rows if row.digest != target]
        if not lagging:
            raise OperationRefused(f"every node runs the same build of {self.name}", "no_drift")
        return self.fan_out(JobKind.UPGRADE, nodes=lagging, requested_by=requested_by, force=True)

    def request_on_node(
        self,
        node: Node,
        kind: str,
        *,
        requested_by: str = "",
        force: bool = False,
        queue: bool = True,
        parent: UpgradeJob | None = None,
    ) -> tuple[UpgradeJob, bool]:
        """Ask for an install, upgrade, rollback or uninstall of this backend on one node.

        Returns (job, created): when an operation on this backend and node is already queued or
        running, that job comes back and nothing new is made. A new job goes to the workers unless
        `queue` is False (the caller then runs it, as the commands do). Raises OperationRefused when
        the operation cannot be done as asked.
        """
        current = self.installed.filter(node=node, state=InstalledVersion.State.CURRENT).first()
        if self.gone and kind in (JobKind.INSTALL, JobKind.UPGRADE):
            raise OperationRefused(f"{self.name} is no longer in gallery {self.gallery_id}")
        if self.occurrence:
            raise OperationRefused(f"{self.name} is a later duplicate in its gallery; the first entry wins")
        if kind == JobKind.UPGRADE and self.pinned and not force:
            raise OperationRefused(f"{self.name} is pinned; unpin it or force the upgrade")
        if kind in (JobKind.UPGRADE, JobKind.ROLLBACK, JobKind.UNINSTALL) and current is None:
            raise OperationRefused(f"{self.name} is not installed on {node.name}")
        if (
            kind == JobKind.ROLLBACK
            and not self.installed.filter(node=node, state=InstalledVersion.State.KEPT).exists()
        ):
            raise OperationRefused(f"{self.name} has no kept version on {node.name} to roll back to")
        job, created = UpgradeJob.create_unless_active(
            kind,
            backend=self,
            node=node,
            requested_by=requested_by,
            force=force,
            from_version=current.version if current else "",
            from_digest=current.digest if current else "",
            parent=parent,
        )
        if created and queue:
            job.enqueue()
        return job, created


class Node(models.Model):
    """A machine holding a backends directory. In standalone mode the one local node is made on use."""

    name = models.CharField(max_length=200, unique=True)
    capability = models.CharField(max_length=100, default="default")
    platform = models.CharField(max_length=100, default="linux/amd64", help_text="os/arch[/variant]")
    backends_path = models.CharField(max_length=1000)
    state_path = models.CharField(max_length=1000, blank=True)
    is_local = models.BooleanField(default=False, help_text="The node this portal process manages.")
    queue = models.CharField(
        max_length=200,
        blank=True,
        help_text="The django-q2 cluster that runs this node's jobs; blank: the default workers.",
    )
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering: ClassVar = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def online(self) -> bool:
        return bool(self.last_heartbeat_at and timezone.now() - self.last_heartbeat_at < HEARTBEAT_TIMEOUT)

    @classmethod
    def local(cls) -> Node:
        """The node this process manages, created or brought up to date from the settings."""
        wanted = {
            "capability": gallery_index.detect_capability(settings.PORTAL_CAPABILITY),
            "platform": settings.PORTAL_PLATFORM,
            "backends_path": str(settings.PORTAL_BACKENDS_PATH),
            "state_path": str(settings.PORTAL_STATE_PATH),
            "queue": settings.PORTAL_NODE_QUEUE,
            "is_local": True,
        }
        node, created = cls.objects.get_or_create(name=settings.PORTAL_NODE_NAME, defaults=wanted)
        if not created and any(getattr(node, key) != value for key, value in wanted.items()):
            for key, value in wanted.items():
                setattr(node, key, value)
            node.save(update_fields=list(wanted))
        return node

    def heartbeat(self) -> None:
        self.last_heartbeat_at = timezone.now()
        self.save(update_fields=["last_heartbeat_at"])


class InstalledVersion(models.Model):
    """A backend version present on a node: the current one, or one kept for rollback."""

    class State(models.TextChoices):
        CURRENT = "current", "current"
        KEPT = "kept", "kept for rollback"

    class Origin(models.TextChoices):
        GALLERY = "gallery", "installed from a gallery"
        ADOPTED = "adopted", "found on disk"
        ROLLBACK = "rollback", "restored by a rollback"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="installed")
    backend = models.ForeignKey(
        Backend, null=True, blank=True, on_delete=models.SET_NULL, related_name="installed"
    )
    name = models.CharField(max_length=255, help_text="Directory name under the backends path.")
    state = models.CharField(max_length=10, choices=State.choices, default=State.CURRENT)
    origin = models.CharField(max_length=10, choices=Origin.choices, default=Origin.GALLERY)
    is_meta = models.BooleanField(default=False)
    meta_backend_for = models.CharField(max_length=255, blank=True)
    alias = models.CharField(max_length=255, blank=True)
    gallery_url = models.CharField(max_length=1000, blank=True)
    version = models.CharField(max_length=200, blank=True)
    uri = models.CharField(max_length=1000, blank=True)
    digest = models.CharField(max_length=100, blank=True)
    installed_at = models.DateTimeField(null=True, blank=True)
    path = models.CharField(max_length=1000)
    problem = models.CharField(max_length=500, blank=True, help_text="What is wrong on disk, if anything.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering: ClassVar = ["node__name", "name", "state", "-installed_at"]
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["node", "name"], condition=Q(state="current"), name="one_current_version_per_node"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.version or self.digest[:19] or '?'} on {self.node_id}"

    @property
    def short_digest(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]


@dataclass(frozen=True)
class EnvironmentLock:
    """A setting the environment decides while it is set (LocalAI's precedence: the environment over
    runtime_settings.json over defaults). The admin, the pages and the API show it and refuse to
    change it; the stored value is kept, and counts again once the variable is unset."""

    field: str
    variable: str
    text: str
    value: Any

    def __str__(self) -> str:
        return f"set by the environment ({self.variable}={self.text})"


class PortalSettings(models.Model):
    """The operator's runtime settings: one row, edited in the admin, the settings page or the API.

    The fields LocalAI also has (`SHARED_WITH_LOCALAI`) are shared through LocalAI's
    runtime_settings.json: read when a process starts and whenever the file changes
    (`watch_runtime_settings`), written by `save()` whenever they change, whoever changed them.
    """

    SINGLETON_PK = 1
    #: Our field -> LocalAI's key in runtime_settings.json. LocalAI checks for upgrades every 6 hours
    #: without a setting for it, so the check interval and the rest are the portal's alone.
    SHARED_WITH_LOCALAI: ClassVar[dict[str, str]] = {"auto_upgrade_backends": "auto_upgrade_backends"}
    #: Why the last `save()` could not write runtime_settings.json ("" when it could, or had nothing to do).
    sharing_error = ""

    auto_upgrade_backends = models.BooleanField(
        default=False, help_text="Upgrade flagged backends automatically after each scheduled check."
    )
    check_interval_minutes = models.PositiveIntegerField(
        default=360, validators=[MinValueValidator(5), MaxValueValidator(60 * 24 * 31)]
    )
    maintenance_window_start = models.TimeField(
        null=True, blank=True, help_text="Automatic upgrades only start inside the window (server time)."
    )
    maintenance_window_end = models.TimeField(null=True, blank=True)
    versions_kept = models.PositiveSmallIntegerField(
        default=1, validators=[MaxValueValidator(10)], help_text="Previous versions kept for rollback."
    )
    health_check_command = models.CharField(
        max_length=1000,
        blank=True,
        help_text="Run after each install on every node, as the portal's user; {path} is the backend "
        "directory. Only a superuser may change it.",
    )
    health_check_timeout = models.PositiveIntegerField(
        default=30, validators=[MinValueValidator(1), MaxValueValidator(3600)]
    )
    last_check_at = models.DateTimeField(null=True, blank=True, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = verbose_name_plural = "portal settings"

    def __str__(self) -> str:
        return "Portal settings"

    def save(self, *args: Any, share: bool = True, **kwargs: Any) -> None:
        """Save the one row, then share the fields LocalAI also has through runtime_settings.json.

        The one place every change passes (admin, pages, API), so the file always follows. `share`
        False is for values that came from the file itself: writing them back could overwrite an
        edit made since they were read. A file that cannot be written does not undo the change: it
        is logged and kept in `sharing_error` for the caller to show.
        """
        self.pk = self.SINGLETON_PK
        super().save(*args, **kwargs)
        fields = kwargs.get("update_fields")
        if share and (fields is None or set(fields) & set(self.SHARED_WITH_LOCALAI)):
            self.sharing_error = self.share_with_localai()

    def clean(self) -> None:
        start, end = self.maintenance_window_start, self.maintenance_window_end
        if (start is None) != (end is None):
            raise ValidationError("A maintenance window needs both a start and an end, or neither.")
        if start is not None and start == end:
            raise ValidationError("A maintenance window's start and end must differ.")

    @classmethod
    def load(cls) -> PortalSettings:
        """The one settings row (made with the defaults on first use)."""
        row, _ = cls.objects.get_or_create(pk=cls.SINGLETON_PK)
        return row

    # -- the environment's say -------------------------------------------------------------------

    @staticmethod
    def environment_locks() -> dict[str, EnvironmentLock]:
        """The fields the environment decides now (`PORTAL_SETTINGS_FROM_ENVIRONMENT`)."""
        return {
            name: EnvironmentLock(name, variable, text, value)
            for name, (variable, text, value) in settings.PORTAL_SETTINGS_FROM_ENVIRONMENT.items()
        }

    def effective(self, name: str) -> Any:
        """What the portal runs with: the environment's value while it locks the field, else the stored."""
        lock = self.environment_locks().get(name)
        return lock.value if lock else getattr(self, name)

    @property
    def auto_upgrade_enabled(self) -> bool:
        """Whether the scheduled check upgrades what it flags (the environment may lock it on)."""
        return bool(self.effective("auto_upgrade_backends"))

    def without_locked(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """`changes` less the fields the environment locks, when asked for the value it locks them at.

        Raises ValidationError naming each locked field asked to take another value: a client that
        sends back what it was shown is fine, one that asks for a change is told why not.
        """
        locks = self.environment_locks()
        refused = {
            name: f"{locks[name]}: unset {locks[name].variable} to change it here"
            for name, value in changes.items()
            if name in locks and value != locks[name].value
        }
        if refused:
            raise ValidationError(refused)
        return {name: value for name, value in changes.items() if name not in locks}

    # -- LocalAI's runtime_settings.json ---------------------------------------------------------

    @staticmethod
    def runtime_settings_path() -> Path | None:
        """LocalAI's runtime_settings.json the portal shares; None when PORTAL_CONFIG_DIR is "off".

        By default in `configuration` beside the backends directory: where LocalAI keeps it when its
        backends are `<dir>/backends` (LocalAI's defaults are `<cwd>/backends` and `<cwd>/configuration`).
        """
        configured = settings.PORTAL_CONFIG_DIR
        if configured.lower() == "off":
            return None
        beside_backends = Path(settings.PORTAL_BACKENDS_PATH).parent / "configuration"
        directory = Path(configured) if configured else beside_backends
        return runtime_settings.path_in(directory.absolute())

    def share_with_localai(self) -> str:
        """Write the shared fields' stored values into runtime_settings.json, every other key kept.

        Nothing is written when the file already says the same (a key LocalAI left out counts as
        LocalAI's default), so saving other fields never creates or rewrites the file. Returns ""
        or why the file could not be written (also logged).
        """
        path = self.runtime_settings_path()
        if path is None:
            return ""
        try:
            on_disk = runtime_settings.read(path)
            changes = {
                key: getattr(self, name)
                for name, key in self.SHARED_WITH_LOCALAI.items()
                if on_disk.get(key, runtime_settings.KEYS[key].default) != getattr(self, name)
            }
            if changes:
                runtime_settings.update(path, changes)
        except runtime_settings.RuntimeSettingsError as exc:
            log.error("settings saved, but not shared with LocalAI: %s", exc)
            return str(exc)
        return ""

    def apply_runtime_settings(self, values: Mapping[str, Any]) -> list[str]:
        """Take the shared fields from runtime_settings.json's (typed) values; returns the fields changed.

        The stored value follows the file even while the environment locks the field (as in
        LocalAI, the environment overrides the file without changing it).
        """
        changed = [
            name
            for name, key in self.SHARED_WITH_LOCALAI.items()
            if key in values and values[key] != getattr(self, name)
        ]
        for name in changed:
            setattr(self, name, values[self.SHARED_WITH_LOCALAI[name]])
        if changed:  # not written back: the file may hold a newer edit already
            self.save(update_fields=[*changed, "updated_at"], share=False)
        return changed

    @classmethod
    def watch_runtime_settings(cls) -> runtime_settings.Watcher | None:
        """Apply runtime_settings.json now, then whenever it changes, from a thread of this process.

        The web and worker processes call it at start. The thread polls every
        PORTAL_CONFIG_POLL_INTERVAL seconds and closes its database connection after each look; an
        interval of 0 reads the file now only. Returns the running watcher, or None when there is
        none (the file is off, or not watched).
        """
        path = cls.runtime_settings_path()
        if path is None:
            return None

        def apply(values: dict[str, Any]) -> None:
            changed = cls.load().apply_runtime_settings(values)
            if changed:
                log.info("%s changed %s", path, ", ".join(changed))

        def close_connection() -> None:  # the watcher thread's own (connections are per thread)
            connection.close()

        watcher = runtime_settings.Watcher(
            path, settings.PORTAL_CONFIG_POLL_INTERVAL, apply, after_each=close_connection
        )
        watcher.check()
        if settings.PORTAL_CONFIG_POLL_INTERVAL <= 0:
            return None
        watcher.start()
        return watcher

    @property
    def check_interval(self) -> dt.timedelta:
        return dt.timedelta(minutes=self.check_interval_minutes)

    def in_maintenance_window(self, moment: dt.datetime | None = None) -> bool:
        """True when no window is set, or `moment` (default now, local time) falls inside it."""
        start, end = self.maintenance_window_start, self.maintenance_window_end
        if start is None or end is None:
            return True
        now = timezone.localtime(moment).time()
        return start <= now < end if start <= end else now >= start or now < end


class JobKind(models.TextChoices):
    INSTALL = "install"
    UPGRADE = "upgrade"
    ROLLBACK = "rollback"
    UNINSTALL = "uninstall"
    CHECK = "check"


class JobStatus(models.TextChoices):
    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    ROLLED_BACK = "rolled_back", "rolled back"
    CANCELLED = "cancelled", "cancelled"
    INTERRUPTED = "interrupted", "interrupted"
    PARTIAL = "partial", "partly failed"

    ACTIVE: ClassVar[tuple[str, ...]]
    FINISHED: ClassVar[tuple[str, ...]]


JobStatus.ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
JobStatus.FINISHED = tuple(s for s in JobStatus.values if s not in JobStatus.ACTIVE)


class JobPhase(models.TextChoices):
    QUEUED = "queued"
    RESOLVING = "resolving"
    DOWNLOADING = "downloading"
    SWAPPING = "swapping"
    HEALTH_CHECK = "health_check", "health check"
    CLEANUP = "cleanup"
    DONE = "done"


class UpgradeJob(models.Model):
    """One operation on one backend on one node (or a check, or a fan-out parent): the record of truth.

    At most one active job exists per backend and node; the database enforces it.
    """

    kind = models.CharField(max_length=10, choices=JobKind.choices)
    status = models.CharField(
        max_length=12, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True
    )
    phase = models.CharField(max_length=20, choices=JobPhase.choices, default=JobPhase.QUEUED)
    backend = models.ForeignKey(
        Backend, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children"
    )
    force = models.BooleanField(default=False)
    canary = models.BooleanField(default=False, help_text="Fan-out: one node first, the rest if it succeeds.")
    cancel_requested = models.BooleanField(default=False)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    percent = models.FloatField(default=0)
    message = models.TextField(blank=True)
    error = models.TextField(blank=True)
    requested_by = models.CharField(max_length=200, blank=True, help_text="Who or what asked for it.")
    from_version = models.CharField(max_length=200, blank=True)
    from_digest = models.CharField(max_length=100, blank=True)
    to_version = models.CharField(max_length=200, blank=True)
    to_digest = models.CharField(max_length=100, blank=True)
    source = models.CharField(max_length=1000, blank=True, help_text="The image reference actually used.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering: ClassVar = ["-created_at", "-id"]
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["backend", "node"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_job_per_backend_node",
            ),
            models.UniqueConstraint(
                fields=["kind"],
                condition=Q(kind="check", status__in=["queued", "running"]),
                name="one_active_check",
            ),
        ]

    def __str__(self) -> str:
        target = self.backend.name if self.backend_id and self.backend else "all backends"
        return f"#{self.pk} {self.kind} {target}"

    @property
    def is_active(self) -> bool:
        return self.status in JobStatus.ACTIVE

    @property
    def duration(self) -> dt.timedelta | None:
        if not self.started_at:
            return None
        return (self.finished_at or timezone.now()) - self.started_at

    @classmethod
    def request_check(cls, requested_by: str = "", *, queue: bool = True) -> tuple[UpgradeJob, bool]:
        """Queue an upgrade check of every installed backend, or return the one already active.

        The database allows one active check. One left active longer than a task may run (its
        process died) is marked interrupted, so it never blocks checks for good. With `queue`
        False the caller runs the new job itself.
        """
        try:
            with transaction.atomic():
                job = cls.objects.create(kind=JobKind.CHECK, requested_by=requested_by)
        except IntegrityError:
            active = cls.objects.filter(kind=JobKind.CHECK, status__in=JobStatus.ACTIVE).first()
            if active is None:
                return cls.request_check(requested_by, queue=queue)
            stale = timezone.now() - dt.timedelta(seconds=settings.PORTAL_TASK_TIMEOUT)
            if (active.started_at or active.created_at) < stale:
                active.fail(
                    "interrupted: its process stopped before it finished", status=JobStatus.INTERRUPTED
                )
                return cls.request_check(requested_by, queue=queue)
            return active, False
        if queue:
            job.enqueue()
        return job, True

    @classmethod
    def create_unless_active(
        cls,
        kind: str,
        *,
        backend: Backend | None = None,
        node: Node | None = None,
        requested_by: str = "",
        **fields: Any,
    ) -> tuple[UpgradeJob, bool]:
        """Create a queued job, or return the active one for the same backend and node.

        Returns (job, created). The database's unique constraint decides between concurrent
        requests, so every replica and process agrees.
        """
        try:
            with transaction.atomic():
                job = cls.objects.create(
                    kind=kind, backend=backend, node=node, requested_by=requested_by, **fields
                )
            return job, True
        except IntegrityError:
            active = cls.objects.filter(backend=backend, node=node, status__in=JobStatus.ACTIVE).first()
            if active is None:  # finished between our insert and this read: try once more
                return cls.create_unless_active(
                    kind, backend=backend, node=node, requested_by=requested_by, **fields
                )
            return active, False

    def enqueue(self) -> None:
        """Hand the job to the workers once the transaction that made it commits (ids, not objects)."""
        from django_q.tasks import async_task

        job_id = self.pk
        # A node's jobs go to the cluster on that node, which owns its backends directory.
        cluster = self.node.queue if self.node_id and self.node and self.node.queue else None
        transaction.on_commit(
            lambda: async_task(
                "backends_app.tasks.run_job", job_id, task_name=f"job-{job_id}", cluster=cluster
            )
        )

    def _update(self, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(self, key, value)
        UpgradeJob.objects.filter(pk=self.pk).update(**fields)
        job_changed.send(sender=UpgradeJob, job=self, fields=tuple(fields))

    def start(self) -> bool:
        """Move a queued job to running; False when it is no longer queued (cancelled meanwhile)."""
        now = timezone.now()
        started = UpgradeJob.objects.filter(pk=self.pk, status=JobStatus.QUEUED).update(
            status=JobStatus.RUNNING, started_at=now
        )
        self.refresh_from_db()
        return bool(started)

    def set_phase(self, phase: str, message: str = "") -> None:
        self._update(phase=phase, message=message or self.message)

    def set_progress(self, done: int, total: int, message: str = "") -> None:
        percent = round(100.0 * done / total, 1) if total else 0.0
        self._update(bytes_done=done, bytes_total=total, percent=percent, message=message or self.message)

    def finish(self, message: str = "", status: str = JobStatus.SUCCEEDED) -> None:
        self._update(
            status=status,
            phase=JobPhase.DONE,
            message=message or self.message,
            finished_at=timezone.now(),
            percent=100.0 if status == JobStatus.SUCCEEDED else self.percent,
        )
        UpgradeJob.settle_parent_of(self)

    def fail(self, error: str, status: str = JobStatus.FAILED) -> None:
        self._update(status=status, error=error, finished_at=timezone.now())
        UpgradeJob.settle_parent_of(self)

    def cancel(self, by: str = "") -> bool:
        """Cancel a queued job now; a running one is asked to stop at its next safe point."""
        note = f"cancelled by {by}" if by else "cancelled"
        cancelled = UpgradeJob.objects.filter(pk=self.pk, status=JobStatus.QUEUED).update(
            status=JobStatus.CANCELLED, message=note, finished_at=timezone.now()
        )
        if not cancelled:
            UpgradeJob.objects.filter(pk=self.pk, status=JobStatus.RUNNING).update(cancel_requested=True)
        for child in self.children.filter(status__in=JobStatus.ACTIVE):
            child.cancel(by)
        self.refresh_from_db()
        if cancelled:
            UpgradeJob.settle_parent_of(self)
        return bool(cancelled) or self.cancel_requested

    @classmethod
    def settle_parent_of(cls, child: UpgradeJob) -> None:
        """After a child job ends: go on with a canary fan-out, or end the parent when all are done.

        The parent ends succeeded (every node), partly failed (some) or failed (none); its message
        names each node's outcome.
        """
        if not child.parent_id:
            return
        with transaction.atomic():
            parent = cls.objects.select_for_update().get(pk=child.parent_id)
            if not parent.is_active:
                return
            children = list(parent.children.select_related("node").order_by("pk"))
            if parent.canary and children and children[0].pk == child.pk:
                if child.status == JobStatus.SUCCEEDED:
                    for rest in children[1:]:
                        if rest.status == JobStatus.QUEUED:
                            rest.enqueue()
                else:
                    note = f"canary on {child.node} ended {child.status}; the other nodes were not touched"
                    cls.objects.filter(pk__in=[c.pk for c in children[1:]], status=JobStatus.QUEUED).update(
                        status=JobStatus.CANCELLED, message=note, finished_at=timezone.now()
                    )
                    children = list(parent.children.select_related("node").order_by("pk"))
            if any(c.status in JobStatus.ACTIVE for c in children):
                return
            succeeded = sum(c.status == JobStatus.SUCCEEDED for c in children)
            status = (
                JobStatus.SUCCEEDED
                if succeeded == len(children)
                else JobStatus.FAILED
                if succeeded == 0
                else JobStatus.PARTIAL
            )
            outcome = "; ".join(
                f"{c.node}: {c.get_status_display()}" + (f" ({c.error})" if c.error else "") for c in children
            )
            parent._update(
                status=status,
                phase=JobPhase.DONE,
                message=f"{succeeded} of {len(children)} node(s) succeeded: {outcome}"[:4000],
                error="" if status == JobStatus.SUCCEEDED else outcome[:4000],
                finished_at=timezone.now(),
                percent=100.0,
            )
