"""The portal's records: galleries and their backends, nodes, installed versions, jobs, settings.

State changes are verbs on these models (`gallery.sync()`, `job.start()`, `backend.pin()`); the admin,
the API, the commands and the tasks call the same verbs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import IntegrityError, connection, connections, models, transaction
from django.db.models import Count, Prefetch, Q, Value
from django.db.models.functions import Concat
from django.dispatch import Signal
from django.utils import timezone

from backends_app import gallery as gallery_index
from backends_app import notify, runtime_settings, sources, versions
from backends_app.disk import layout
from backends_app.oci import signatures

log = logging.getLogger(__name__)

#: Sent after a job's row changed (`job` the instance, `fields` the names written). The live pages
#: subscribe in `BackendsAppConfig.ready`; the models never import an entry point.
job_changed = Signal()
#: Sent after each gallery sync, failed or not (`gallery`, `result`: a SyncResult); metrics count it.
gallery_synced = Signal()

# A node is online while its heartbeat is younger than this.
HEARTBEAT_TIMEOUT = dt.timedelta(seconds=90)
# Gallery entries stored per transaction: each holds SQLite's write lock for tens of milliseconds.
SYNC_BATCH = 500
# Seconds a sync leaves SQLite's write lock free between two batches: a little more than the
# longest interval at which SQLite's busy handler retries (100 ms), so a waiting writer gets in.
SQLITE_WRITER_PAUSE = 0.11


#: The gallery holding backends installed from a uri no gallery lists (`BackendManager.external`).
EXTERNAL_GALLERY = "external"


class OperationRefused(Exception):
    """An operation that cannot be queued as asked; `reason` says why in one word for programs:
    pinned, not_installed, nothing_kept, gone, duplicate, busy, no_nodes, invalid."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class GalleryQuerySet(models.QuerySet["Gallery"]):
    def request_sync(self, *, cluster: str | None = None) -> list[str]:
        """Ask the workers to sync these galleries (one task, after commit); returns their names.

        `sync_requested_at` marks them, so the pages can say a sync is on its way until it ran.
        `cluster` picks the django-q2 cluster (default: the default workers).
        """
        from django_q.tasks import async_task

        names = list(self.order_by("name").values_list("name", flat=True))
        if not names:
            return []
        Gallery.objects.filter(name__in=names).update(sync_requested_at=timezone.now())
        transaction.on_commit(
            lambda: async_task(
                "backends_app.tasks.sync_galleries", names, task_name="gallery-sync", cluster=cluster
            )
        )
        return names


class SignatureMode(models.TextChoices):
    """What a gallery's installs require of their images' Sigstore signatures (docs/signatures.md)."""

    OFF = signatures.OFF, "off: not checked"
    WARN = signatures.WARN, "warn: checked, a failure is noted and the install goes on"
    ENFORCE = signatures.ENFORCE, "enforce: an image that does not verify is refused"


class Gallery(models.Model):
    """A LocalAI backend gallery index the portal follows.

    `url` never carries credentials: a URL given with a user, a password or query values is split
    on save, `url` keeping the shareable part (`gallery.public_url`) and `url_with_credentials`
    the whole, which only the fetch reads. Saving a URL whose shareable part is unchanged keeps
    the credentials (the admin shows the shareable part and gets it back); any other URL replaces
    them. `set_through_web` marks a URL that came from the API or the admin: its fetch is confined
    (see `gallery.check_web_url`) and its failures are told without the document's content.

    The `verification_*` fields are LocalAI's gallery `verification` block: whose Sigstore signature
    the gallery's images must carry. `signature_mode` says what a failure does; a block given
    through PORTAL_GALLERIES or the API without a mode enforces, as in LocalAI.
    """

    name = models.SlugField(max_length=100, unique=True)
    url = models.CharField(
        max_length=1000,
        help_text="https://..., file:///path or github:owner/repo/path@branch. A user, password or "
        "query values given here are kept apart and never shown again.",
    )
    url_with_credentials = models.CharField(max_length=2000, blank=True, editable=False)
    set_through_web = models.BooleanField(default=False, editable=False)
    enabled = models.BooleanField(default=True)
    etag = models.CharField(max_length=500, blank=True, editable=False)
    last_synced_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_attempt_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    entry_count = models.PositiveIntegerField(default=0, editable=False)
    # Each sync that stores an index takes the next number; one that finds a newer number stops.
    sync_generation = models.PositiveBigIntegerField(default=0, editable=False)
    sync_requested_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When a sync was last asked of the workers."
    )
    signature_mode = models.CharField(
        "signatures",
        max_length=10,
        choices=SignatureMode.choices,
        default=SignatureMode.OFF,
        help_text="What installs from this gallery require of their images' Sigstore signatures. "
        "LOCALAI_REQUIRE_BACKEND_INTEGRITY (or PORTAL_REQUIRE_SIGNATURES) enforces every gallery.",
    )
    verification_issuer = models.CharField(
        "issuer", max_length=500, blank=True, help_text="The OIDC issuer, exactly."
    )
    verification_issuer_regex = models.CharField(
        "issuer regex", max_length=500, blank=True, help_text="A regular expression the issuer must match."
    )
    verification_identity = models.CharField(
        "identity",
        max_length=1000,
        blank=True,
        help_text="The signing certificate's identity (its URI or email SAN), exactly.",
    )
    verification_identity_regex = models.CharField(
        "identity regex",
        max_length=1000,
        blank=True,
        help_text="A regular expression the identity must match; unanchored, as in LocalAI: write ^...$.",
    )
    verification_not_before = models.DateTimeField(
        "not before",
        null=True,
        blank=True,
        help_text="Signatures made before this time are refused (the revocation lever).",
    )

    VERIFICATION_FIELDS: ClassVar = {
        "issuer": "verification_issuer",
        "issuer_regex": "verification_issuer_regex",
        "identity": "verification_identity",
        "identity_regex": "verification_identity_regex",
        "not_before": "verification_not_before",
    }

    objects = GalleryQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "galleries"
        ordering: ClassVar = ["name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        self._keep_credentials_apart()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        problems = self.signature_problems()
        if problems:
            raise ValidationError(problems)

    def signature_problems(self) -> dict[str, str]:
        """What is wrong with the signature settings, by field: a mode that checks needs a complete
        verification block (LocalAI's rule), and regular expressions must compile."""
        block = self.verification
        if block is None:
            if self.signature_mode != SignatureMode.OFF:
                return {
                    "signature_mode": "checking signatures needs a verification block: "
                    "issuer or issuer regex, and identity or identity regex"
                }
            return {}
        return {self.VERIFICATION_FIELDS[key]: text for key, text in block.problems().items()}

    @property
    def verification(self) -> signatures.Verification | None:
        """The verification block as LocalAI reads it, or None when no field is set."""
        block = signatures.Verification(
            issuer=self.verification_issuer,
            issuer_regex=self.verification_issuer_regex,
            identity=self.verification_identity,
            identity_regex=self.verification_identity_regex,
            not_before=self.verification_not_before,
        )
        return None if block.is_empty else block

    def set_verification(self, block: signatures.Verification | None, mode: str | None = None) -> None:
        """Replace the block (None clears it). Without `mode`, a block makes an unchecked gallery
        enforce (a policy always enforces in LocalAI) and clearing it turns checking off."""
        block = block or signatures.Verification()
        for key, field_name in self.VERIFICATION_FIELDS.items():
            setattr(self, field_name, getattr(block, key))
        if mode is not None:
            self.signature_mode = mode
        elif block.is_empty:
            self.signature_mode = SignatureMode.OFF
        elif self.signature_mode == SignatureMode.OFF:
            self.signature_mode = SignatureMode.ENFORCE

    def signature_policy(self) -> signatures.SignaturePolicy:
        """What installs from this gallery require now, strict integrity (the environment) applied."""
        return signatures.SignaturePolicy.effective(
            self.signature_mode,
            self.verification,
            gallery=self.name,
            strict=settings.PORTAL_REQUIRE_SIGNATURES,
        )

    def _keep_credentials_apart(self) -> None:
        given = (self.url or "").strip()
        shown = gallery_index.public_url(given)
        if shown != given:
            self.url, self.url_with_credentials = shown, given
        else:
            self.url = given
            if self.url_with_credentials and gallery_index.public_url(self.url_with_credentials) != given:
                self.url_with_credentials = ""

    @property
    def has_credentials(self) -> bool:
        return bool(self.url_with_credentials)

    def forget_credentials(self) -> None:
        self.url_with_credentials = ""

    @property
    def is_file(self) -> bool:
        return self.url.lower().startswith("file:")

    @property
    def sync_pending(self) -> bool:
        """A sync was asked for and no attempt has been made since."""
        requested = self.sync_requested_at
        return requested is not None and (self.last_attempt_at is None or self.last_attempt_at < requested)

    def sync(self, *, force: bool = False) -> SyncResult:
        """Fetch and store the index. A failure changes no backend and is recorded on the gallery.

        `force` ignores the stored ETag, so the index is fetched and compared again. The index is
        parsed whole first (any invalid entry refuses it all), then stored in short transactions
        (`Backend.objects.store_entries`) so the database stays writable for everyone else.
        """
        now = timezone.now()
        confined = settings.PORTAL_GALLERY_FILE_ROOTS if self.set_through_web else None
        try:
            fetched = gallery_index.fetch(
                self.url_with_credentials or self.url,
                etag="" if force else self.etag,
                timeout=settings.PORTAL_GALLERY_TIMEOUT,
                max_bytes=settings.PORTAL_GALLERY_MAX_BYTES,
                confined_to=confined,
            )
            if fetched.not_modified:
                Gallery.objects.filter(pk=self.pk).update(
                    last_attempt_at=now, last_synced_at=now, last_error=""
                )
                self.refresh_from_db()
                return self._synced(SyncResult(gallery=self.name, not_modified=True, total=self.entry_count))
        except gallery_index.GalleryError as exc:
            return self._synced(self._failed(exc, now, parsing=False))
        try:
            entries = gallery_index.parse(
                fetched.text or "",
                self.url,
                max_entries=settings.PORTAL_GALLERY_MAX_ENTRIES,
                max_nodes=settings.PORTAL_GALLERY_MAX_NODES,
            )
        except gallery_index.GalleryError as exc:
            return self._synced(self._failed(exc, now, parsing=True))
        etag = fetched.etag
        del fetched  # the document's text; the entries hold what is needed
        generation = self._begin_storing(now)
        try:
            result = Backend.objects.store_entries(self, entries, generation=generation)
            # Worked out before the last transaction, which then only writes: it marks what
            # vanished, links the metas and records the index as complete, all or nothing.
            vanished = Backend.objects.vanished(self, result.seen)
            links = Backend.objects.meta_links(self)
            with transaction.atomic():
                self._still_current(generation)
                Backend.objects.mark_gone(vanished)
                Backend.objects.link_metas(links)
                Gallery.objects.filter(pk=self.pk).update(
                    etag=etag, last_synced_at=now, last_error="", entry_count=len(entries)
                )
            result.gone = len(vanished)
        except SyncSuperseded as exc:
            log.warning("gallery %s: %s", self.name, exc)
            return self._synced(SyncResult(gallery=self.name, error=str(exc)))
        self.refresh_from_db()
        return self._synced(result)

    def _synced(self, result: SyncResult) -> SyncResult:
        """Every sync ends here: subscribers (metrics) hear of it, then the caller gets the result."""
        gallery_synced.send(sender=Gallery, gallery=self, result=result)
        return result

    def _failed(self, exc: gallery_index.GalleryError, now: dt.datetime, *, parsing: bool) -> SyncResult:
        """Record a failed fetch or parse. Logged in full; a URL set through the web gets a message
        that tells nothing about the file or the document it found (see docs/galleries.md)."""
        log.warning("gallery %s: sync failed: %s", self.name, exc)
        message = str(exc)
        if self.set_through_web and self.is_file:
            message = (
                f"gallery {self.url}: cannot be read as a gallery index from the web's side "
                "(missing, unreadable, outside the allowed directories or invalid); the server log "
                "has the details"
            )
        elif self.set_through_web and parsing and not exc.bound:
            message = f"gallery {self.url}: not a valid gallery index; the server log has the details"
        Gallery.objects.filter(pk=self.pk).update(last_attempt_at=now, last_error=message)
        self.refresh_from_db()
        return SyncResult(gallery=self.name, error=message)

    def _begin_storing(self, now: dt.datetime) -> int:
        """Take the next sync generation and clear the ETag, in one short transaction.

        Until the last transaction of this sync commits, the stored rows may be part old, part
        new; the empty ETag makes the next sync fetch and store everything again, whatever
        happens to this one (killed, out of disk, overtaken by a newer sync).
        """
        with transaction.atomic():
            Gallery.objects.filter(pk=self.pk).update(
                sync_generation=models.F("sync_generation") + 1, etag="", last_attempt_at=now
            )
            return int(Gallery.objects.values_list("sync_generation", flat=True).get(pk=self.pk))

    def _still_current(self, generation: int) -> None:
        """Inside a transaction: lock this gallery's row, or raise if a newer sync took over."""
        if not Gallery.objects.filter(pk=self.pk, sync_generation=generation).update(
            sync_generation=generation
        ):
            raise SyncSuperseded(
                f"a newer sync of gallery {self.name} took over; this one stopped without finishing"
            )


class SyncSuperseded(Exception):
    """A newer sync of the same gallery started; the older one stops at its next transaction."""


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
    # (name, occurrence) of every entry stored: what is not in it is gone.
    seen: set[tuple[str, int]] = field(default_factory=set, repr=False)

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

    def drifting(self) -> BackendQuerySet:
        """Backends whose nodes do not all run the same build: more than one (version, digest)
        among their current installed rows. `Backend.node_drift` says which nodes differ."""
        builds = (
            InstalledVersion.objects.filter(state=InstalledVersion.State.CURRENT, backend__isnull=False)
            .values("backend")
            .annotate(builds=Count(Concat("version", Value("@"), "digest"), distinct=True))
            .filter(builds__gt=1)
            .values("backend")
        )
        return self.filter(pk__in=builds)

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
    def store_entries(
        self, source: Gallery, entries: list[gallery_index.GalleryEntry], *, generation: int
    ) -> SyncResult:
        """Create new rows and update changed ones, SYNC_BATCH entries per transaction.

        A name's first occurrence wins (as LocalAI's lookup does); later duplicates are kept as rows
        with `occurrence` > 0 so the index is stored whole. Rows are compared field by field, so
        storing the same index twice writes nothing. Each transaction first checks that sync
        `generation` is still the gallery's newest (`SyncSuperseded` otherwise) and holds the
        write lock for one batch only: SQLite has a single writer, and a whole index in one
        transaction made every other writer wait past its busy timeout. Marking vanished rows
        gone and linking metas wait for the sync's last transaction (`Gallery.sync`).
        """
        result = SyncResult(gallery=source.name, total=len(entries))
        occurrences: dict[str, int] = {}
        for start in range(0, len(entries), SYNC_BATCH):
            batch = []
            for entry in entries[start : start + SYNC_BATCH]:
                occurrence = occurrences.get(entry.name, 0)
                occurrences[entry.name] = occurrence + 1
                if occurrence:
                    result.duplicates.append(entry.name)
                batch.append((entry, occurrence))
                result.seen.add((entry.name, occurrence))
            # Compared outside the write transaction, so it holds the lock only to write.
            to_create, to_update = self._compare_batch(source, batch)
            if not to_create and not to_update:
                continue  # nothing to write; the sync's last transaction checks the generation
            with transaction.atomic():
                source._still_current(generation)
                self.bulk_create(to_create, batch_size=SYNC_BATCH)
                if to_update:
                    fields = [*Backend.ENTRY_FIELDS, "gone", "updated_at"]
                    self.bulk_update(to_update, fields, batch_size=SYNC_BATCH)
            result.created += len(to_create)
            result.updated += len(to_update)
            if connections[self.db].vendor == "sqlite" and start + SYNC_BATCH < len(entries):
                # A waiting SQLite writer polls the lock every 100 ms at most (its busy handler);
                # taking the lock again at once would starve it until the whole index is stored.
                time.sleep(SQLITE_WRITER_PAUSE)
        return result

    def _compare_batch(
        self, source: Gallery, batch: list[tuple[gallery_index.GalleryEntry, int]]
    ) -> tuple[list[Backend], list[Backend]]:
        """The rows to create and the rows to update for a batch of (entry, occurrence)."""
        names = {entry.name for entry, _ in batch}
        existing = {(b.name, b.occurrence): b for b in self.filter(gallery=source, name__in=names)}
        to_create: list[Backend] = []
        to_update: list[Backend] = []
        for entry, occurrence in batch:
            values = Backend.values_from_entry(entry)
            row = existing.get((entry.name, occurrence))
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
        return to_create, to_update

    def external(
        self,
        uri: str,
        *,
        name: str = "",
        alias: str = "",
        sha256: str = "",
        from_command_line: bool = False,
    ) -> Backend:
        """The backend row for an install from a uri no gallery lists (LocalAI's install-external).

        Rows live in the gallery `EXTERNAL_GALLERY` (disabled: never synced), one per name, and an
        install of the same name again replaces the uri. As LocalAI: a local directory's name
        defaults to the directory's own name, an image needs one; an archive's name defaults to
        its file name without the archive extension. A local path named through the web (not
        `from_command_line`) must lie below the node's `Node.source_roots`: the procedure checks it
        when the job runs, on the node that reads it (as LocalAI, the request itself is accepted).
        Raises OperationRefused (reason ``invalid``) for a missing uri or name.
        """
        uri = uri.strip()
        if not uri:
            raise OperationRefused("uri is required", "invalid")
        if uri.lower().startswith("ocifile://"):
            raise OperationRefused(
                "ocifile:// (an image tarball on disk) is not supported: push the image to a registry, "
                "or unpack the backend into a directory and install that",
                "invalid",
            )
        kind = sources.kind_of(uri)
        if not name:
            if kind == sources.IMAGE:
                raise OperationRefused("specifying a name is required for OCI images", "invalid")
            base = Path(sources.shown(uri).partition("?")[0].rstrip("/")).name
            for suffix in sorted(sources.ARCHIVE_SUFFIXES, key=len, reverse=True):
                if base.lower().endswith(suffix) and base[: -len(suffix)]:
                    base = base[: -len(suffix)]
                    break
            name = base
        try:
            layout.check_name(name)
            if alias:
                layout.check_name(alias, "alias")
        except layout.LayoutError as exc:
            raise OperationRefused(str(exc), "invalid") from None
        gallery, _ = Gallery.objects.get_or_create(
            name=EXTERNAL_GALLERY, defaults={"url": "", "enabled": False, "set_through_web": False}
        )
        if gallery.enabled or gallery.url:
            raise OperationRefused(
                f"a gallery named {EXTERNAL_GALLERY!r} is followed ({gallery.url}); the portal keeps that "
                "name for external installs: rename the gallery",
                "taken",
            )
        existing = self.filter(gallery=gallery, name=name, occurrence=0).first()
        if existing is not None and existing.jobs.filter(status__in=JobStatus.ACTIVE).exists():
            return existing  # an operation on it is under way: `request` brings that job back
        entry = {"name": name, "uri": uri, **({"alias": alias} if alias else {})}
        if sha256:
            entry["sha256"] = sha256
        values = {
            "uri": uri,
            "alias": alias,
            "sha256": sha256,
            "entry": entry,
            "gone": False,
            "is_meta": False,
            "mirrors": [],
            "version": "",
            "source_trusted": from_command_line,
        }
        backend, _ = self.update_or_create(gallery=gallery, name=name, occurrence=0, defaults=values)
        return backend

    def vanished(self, source: Gallery, seen: set[tuple[str, int]]) -> list[int]:
        """The gallery's rows not yet gone that the stored index no longer lists (a read)."""
        present = self.filter(gallery=source, gone=False).values_list("pk", "name", "occurrence")
        return [pk for pk, name, occurrence in present.iterator() if (name, occurrence) not in seen]

    def mark_gone(self, pks: list[int]) -> None:
        now = timezone.now()
        for start in range(0, len(pks), SYNC_BATCH):
            self.filter(pk__in=pks[start : start + SYNC_BATCH]).update(gone=True, updated_at=now)

    def meta_links(self, source: Gallery) -> dict[int | None, list[int]]:
        """The meta rows whose concrete entry for this machine's capability changed, by new target
        (a read; `link_metas` writes it). Non-meta rows still linked are unlinked."""
        capability = gallery_index.detect_capability(settings.PORTAL_CAPABILITY)
        visible = self.visible().filter(gallery=source)
        by_name = dict(visible.values_list("name", "pk").iterator())
        changes: dict[int | None, list[int]] = {}
        rows = visible.filter(Q(is_meta=True) | Q(resolves_to__isnull=False))
        for pk, is_meta, capabilities, current in rows.values_list(
            "pk", "is_meta", "capabilities", "resolves_to_id"
        ).iterator():
            name = Backend(capabilities=capabilities).concrete_name_for(capability) if is_meta else ""
            target = by_name.get(name)
            if target != current:
                changes.setdefault(target, []).append(pk)
        return changes

    def link_metas(self, changes: dict[int | None, list[int]]) -> None:
        for target, pks in changes.items():
            for start in range(0, len(pks), SYNC_BATCH):
                self.filter(pk__in=pks[start : start + SYNC_BATCH]).update(resolves_to=target)


# The check writes `upgrade_reason` with this prefix when a newer build's signature is refused.
REFUSED_PREFIX = "refused: "


class BackendState(models.TextChoices):
    """What an operator needs to know first about a backend; `Backend.status` decides it."""

    NOT_INSTALLED = "not_installed", "not installed"
    HELD = "held", "held"
    PINNED = "pinned", "pinned"
    REFUSED = "refused", "upgrade refused"
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
        "hardware",
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
    hardware = models.CharField(
        max_length=20,
        blank=True,
        db_index=True,
        help_text="What a concrete entry needs (metal, nvidia-l4t, nvidia, amd, intel; empty: any CPU), "
        "read from its name and image as LocalAI does.",
    )
    source_trusted = models.BooleanField(
        default=False,
        editable=False,
        help_text="Installed from the command line: a local directory or file uri may lie outside "
        "PORTAL_BACKEND_SOURCE_ROOTS.",
    )

    # Filled by the upgrade check.
    latest_digest = models.CharField(max_length=100, blank=True)
    available_version = models.CharField(max_length=200, blank=True)
    upgrade_available = models.BooleanField(default=False, db_index=True)
    upgrade_reason = models.CharField(max_length=500, blank=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    check_note = models.CharField(
        max_length=500,
        blank=True,
        help_text="What the last check saw that is not an upgrade (a tag rebuilt under the same version...).",
    )

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
        registry offers); pinned (never upgraded automatically; says what is available); refused
        (the newer build's signature does not satisfy its gallery's enforced policy); upgrade
        available (with the check's reason); error (the last check could not decide); not checked
        yet; up to date (with what the check noticed that is no upgrade, such as a tag rebuilt under
        the same version). Uses the installed rows `with_installations` prefetches.
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
        if self.upgrade_reason.startswith(REFUSED_PREFIX):
            return BackendStatus(BackendState.REFUSED, self.upgrade_reason.removeprefix(REFUSED_PREFIX))
        if self.upgrade_available:
            return BackendStatus(BackendState.UPGRADE_AVAILABLE, self.upgrade_reason)
        if self.last_error:
            return BackendStatus(BackendState.ERROR, self.last_error)
        if self.last_checked_at is None:
            return BackendStatus(BackendState.NOT_CHECKED)
        return BackendStatus(BackendState.UP_TO_DATE, self.check_note)

    @property
    def is_development(self) -> bool:
        return self.name.endswith("-development")

    @property
    def reference_chain(self) -> list[str]:
        """The image references to try, in order: the uri, then the mirrors."""
        return [ref for ref in [self.uri, *self.mirrors] if ref]

    @property
    def source_chain(self) -> list[str]:
        """Where an install tries to get this backend, in LocalAI's order (`chain_for`)."""
        return self.chain_for(self.uri, self.mirrors)

    @staticmethod
    def chain_for(uri: str, mirrors: list[str] | None) -> list[str]:
        """The uri, the mirrors, then the uri's tag fallbacks (``latest-X`` -> ``master-X`` ->
        ``master-X-development``, LocalAI's names configurable), without repeats. With LocalAI's
        prefer_development_backends on, the branch build (``master-X``) comes first, then the uri."""
        chain: list[str] = []
        fallbacks = sources.fallback_uris(
            uri,
            settings.PORTAL_BACKEND_RELEASE_TAG,
            settings.PORTAL_BACKEND_BRANCH_TAG,
            settings.PORTAL_BACKEND_DEV_SUFFIX,
        )
        preferred = None
        if PortalSettings.prefer_development_backends():
            preferred = sources.development_uri(
                uri, settings.PORTAL_BACKEND_RELEASE_TAG, settings.PORTAL_BACKEND_BRANCH_TAG
            )
        for ref in [preferred, uri, *(mirrors or []), *fallbacks]:
            if ref and ref not in chain:
                chain.append(ref)
        return chain

    @property
    def source_kind(self) -> str:
        """`sources.IMAGE`, `sources.PATH` or `sources.URL`: what the uri names."""
        return sources.kind_of(self.uri) if self.uri else sources.IMAGE

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
            "hardware": "" if entry.is_meta else gallery_index.hardware_of(entry.name, entry.uri),
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

    def rollback_target_on(self, node_id: int) -> InstalledVersion | None:
        """The kept version a rollback on a node puts back: the newest kept one (by when it was
        kept) that is older than the live one (`versions.is_older`), or None. A kept version newer
        than the live one (left by an earlier rollback) is never a rollback's target.
        `with_installations` saves the query; the rollback procedure applies the same rule on disk.
        """
        live = next((row for row in self.current_versions() if row.node_id == node_id), None)
        if live is None:
            return None
        kept = sorted(self.kept_versions_on(node_id), key=lambda row: Path(row.path).name)
        for row in reversed(kept):
            if versions.is_older(row.version, row.installed_at, live.version, live.installed_at):
                return row
        return None

    def record_installed(self, *, version: str, digest: str) -> None:
        """After an install or upgrade from the registry: what was pulled is what the registry
        offers now (`latest_digest`, `available_version`, what `converge` aims at). When every node
        runs that build, the check's other fields say so too (up to date, no error, checked now)
        instead of "not checked" until the next check; a node still on another build keeps the
        backend as it was flagged, and the next check decides.
        """
        if not digest:
            return
        Backend.objects.filter(pk=self.pk).update(latest_digest=digest, available_version=version)
        lagging = (
            InstalledVersion.objects.filter(backend=self, state=InstalledVersion.State.CURRENT, is_meta=False)
            .exclude(digest=digest)
            .exists()
        )
        if lagging:
            return
        Backend.objects.filter(pk=self.pk).update(
            upgrade_available=False,
            upgrade_reason="",
            last_error="",
            check_note="",
            last_checked_at=timezone.now(),
        )

    @property
    def drift(self) -> bool:
        """True when the nodes that have this backend do not all run the same build."""
        return len({row.digest or row.version for row in self.current_versions()}) > 1

    def _reporting_rows(self) -> list[InstalledVersion]:
        # LocalAI counts the nodes that answer (core/services/nodes: no offline node); a node that
        # never sent a heartbeat (the local node of a standalone portal) counts.
        return [
            row for row in self.current_versions() if row.node.last_heartbeat_at is None or row.node.online
        ]

    def majority_build(self) -> tuple[str, str]:
        """The (version, digest) most nodes run: the first pair to reach the highest count, in node
        order (LocalAI's summarizeNodeDrift). ("", "") when installed nowhere."""
        counts: Counter[tuple[str, str]] = Counter()
        top, top_count = ("", ""), 0
        for row in self._reporting_rows():
            pair = (row.version, row.digest)
            counts[pair] += 1
            if counts[pair] > top_count:
                top, top_count = pair, counts[pair]
        return top

    def node_drift(self) -> list[dict[str, str]]:
        """LocalAI's ``node_drift`` (core/gallery/upgrade.go): every node whose (version, digest)
        differs from the majority's (`majority_build`), in node order, as ``{"node_id",
        "node_name", "version"?, "digest"?}`` (empty values left out). Empty when all agree."""
        rows = self._reporting_rows()
        if len({(row.version, row.digest) for row in rows}) < 2:
            return []
        majority = self.majority_build()
        drift = []
        for row in rows:
            if (row.version, row.digest) == majority:
                continue
            item = {"node_id": str(row.node_id), "node_name": row.node.name}
            if row.version:
                item["version"] = row.version
            if row.digest:
                item["digest"] = row.digest
            drift.append(item)
        return drift

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
        if kind == JobKind.ROLLBACK and self.rollback_target_on(node.pk) is None:
            if self.installed.filter(node=node, state=InstalledVersion.State.KEPT).exists():
                raise OperationRefused(
                    f"{self.name} has no kept version on {node.name} older than the live one "
                    "(the kept ones are newer: an upgrade goes forward)",
                    "nothing_kept",
                )
            raise OperationRefused(
                f"{self.name} has no kept version on {node.name} to roll back to", "nothing_kept"
            )
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

    @property
    def source_roots(self) -> list[Path]:
        """Where a local directory or file archive that a gallery or the web names may be read from:
        PORTAL_BACKEND_SOURCE_ROOTS, by default the data directory and the backends directory's
        parent. (The command line may name any directory: `Backend.source_trusted`.)"""
        if settings.PORTAL_BACKEND_SOURCE_ROOTS:
            return list(settings.PORTAL_BACKEND_SOURCE_ROOTS)
        roots = [Path(settings.DATA_DIR), Path(self.backends_path).parent]
        return list(dict.fromkeys(roots))

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

    class Signature(models.TextChoices):
        NOT_CHECKED = "", "not checked"
        VERIFIED = "verified", "verified"
        UNVERIFIED = "unverified", "not verified (warn)"

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
    # Read from metadata.json like the rest, so they follow the tree through upgrades and rollbacks.
    signature = models.CharField(
        max_length=12,
        choices=Signature.choices,
        blank=True,
        help_text="What the install found of the image's Sigstore signature.",
    )
    signer_identity = models.CharField(max_length=1000, blank=True, help_text="The verified signer (SAN).")
    signer_issuer = models.CharField(max_length=500, blank=True, help_text="Its OIDC issuer.")
    signed_at = models.DateTimeField(null=True, blank=True, help_text="The signature's verified time.")
    signature_note = models.CharField(
        max_length=500, blank=True, help_text="Why it did not verify (warn), or where the bundle was."
    )
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

    @property
    def signature_summary(self) -> str:
        """One line for the pages: who signed it, or why it did not verify."""
        if self.signature == self.Signature.VERIFIED:
            return f"signed by {self.signer_identity} ({self.signer_issuer})"
        if self.signature == self.Signature.UNVERIFIED:
            return f"signature not verified: {self.signature_note}"
        return ""


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
    last_check_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="When the periodic check last claimed its interval (the once-per-interval guard).",
    )
    last_check_finished_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When the last upgrade check, whoever asked, ended."
    )
    last_check_by = models.CharField(max_length=200, blank=True, editable=False)
    notify_urls_seeded = models.BooleanField(
        default=False, editable=False, help_text="PORTAL_NOTIFY_URLS has given the initial notification URLs."
    )
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

    @classmethod
    def record_check(cls, *, finished_at: dt.datetime, requested_by: str) -> None:
        """Remember the last check that ran to its end, scheduled or asked for by hand."""
        cls.load()
        cls.objects.filter(pk=cls.SINGLETON_PK).update(
            last_check_finished_at=finished_at, last_check_by=requested_by[:200]
        )

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

    @classmethod
    def prefer_development_backends(cls) -> bool:
        """LocalAI's prefer_development_backends: the environment's true value, else what
        runtime_settings.json says (read again only when it changed), else false."""
        if settings.PORTAL_PREFER_DEV_BACKENDS:
            return True
        path = cls.runtime_settings_path()
        if path is None:
            return False
        return runtime_settings.current(path).get("prefer_development_backends") is True

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
    uuid = models.UUIDField(
        default=uuid.uuid4,
        unique=True,
        editable=False,
        help_text="The job's id on LocalAI's routes, which name jobs by UUID (the portal's own API "
        "uses the number).",
    )
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
    restarts = models.PositiveSmallIntegerField(
        default=0,
        editable=False,
        help_text="Times the job was queued again after its worker was killed while it downloaded.",
    )
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
    new_log_entries: list[JobMessage]  # what the last `_update` logged, for the live pages
    log_count = models.PositiveIntegerField(
        default=0, editable=False, help_text="Messages written to the job's log, kept or not."
    )

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
        """Write `fields`, log what a reader would want to see later (a new message, phase, error or
        end), and tell the live pages.

        The log lines go in before the row changes: whoever reads the new state (a page polling the
        row) finds its lines there, counted in `log_count`.
        """
        entries = self._log_entries_for(fields)
        rows = self._insert_log(entries, phase=fields.get("phase", self.phase))
        for key, value in fields.items():
            setattr(self, key, value)
        written: dict[str, Any] = dict(fields)
        if rows:
            written["log_count"] = models.F("log_count") + len(rows)
            self.log_count += len(rows)
        UpgradeJob.objects.filter(pk=self.pk).update(**written)
        self._trim_log()
        self.new_log_entries = rows
        job_changed.send(sender=UpgradeJob, job=self, fields=(*fields, "log") if rows else tuple(fields))

    def _log_entries_for(self, fields: dict[str, Any]) -> list[tuple[str, str]]:
        """(kind, text) of the log lines a change of `fields` makes, compared to the values now held."""
        entries: list[tuple[str, str]] = []
        phase_changed = "phase" in fields and fields["phase"] != self.phase
        message = fields.get("message", self.message)
        if message and message != self.message:
            entries.append((JobMessage.Kind.MESSAGE, message))
        elif phase_changed and fields["phase"] not in (JobPhase.QUEUED, JobPhase.DONE):
            entries.append((JobMessage.Kind.MESSAGE, JobPhase(fields["phase"]).label))
        if fields.get("error") and fields["error"] != self.error:
            entries.append((JobMessage.Kind.ERROR, fields["error"]))
        if "status" in fields and fields["status"] != self.status:
            entries.append((JobMessage.Kind.STATUS, JobStatus(fields["status"]).label))
        return entries

    def _insert_log(self, entries: list[tuple[str, str]], *, phase: str) -> list[JobMessage]:
        if not entries:
            return []
        now = timezone.now()
        return JobMessage.objects.bulk_create(
            [
                JobMessage(job_id=self.pk, at=now, phase=phase, kind=kind, text=text[: JobMessage.TEXT_LIMIT])
                for kind, text in entries
            ]
        )

    def _trim_log(self) -> None:
        """Keep the log bounded: the first `JobMessage.HEAD` lines and the latest, `LIMIT` in all."""
        if self.log_count <= JobMessage.LIMIT:
            return
        ids = list(JobMessage.objects.filter(job_id=self.pk).order_by("id").values_list("id", flat=True))
        excess = len(ids) - JobMessage.LIMIT
        if excess > 0:
            JobMessage.objects.filter(pk__in=ids[JobMessage.HEAD : JobMessage.HEAD + excess]).delete()

    def write_log(self, entries: list[tuple[str, str]]) -> list[JobMessage]:
        """Append (kind, text) lines to the job's log, stamped now by this server.

        `log_count` counts every line written; the log keeps at most `JobMessage.LIMIT` of them (the
        first and the latest), so a reader can say how many in between were dropped.
        """
        rows = self._insert_log(entries, phase=self.phase)
        if rows:
            UpgradeJob.objects.filter(pk=self.pk).update(log_count=models.F("log_count") + len(rows))
            self.log_count += len(rows)
            self._trim_log()
        return rows

    def start(self) -> bool:
        """Move a queued job to running; False when it is no longer queued (cancelled meanwhile)."""
        now = timezone.now()
        started = UpgradeJob.objects.filter(pk=self.pk, status=JobStatus.QUEUED).update(
            status=JobStatus.RUNNING, started_at=now
        )
        self.refresh_from_db()
        if started:
            self.new_log_entries = self.write_log([(JobMessage.Kind.STATUS, JobStatus.RUNNING.label)])
            job_changed.send(sender=UpgradeJob, job=self, fields=("status", "started_at", "log"))
        return bool(started)

    RESUMED_MESSAGE = "resumed after the worker restarted"

    def resume_after_restart(self, limit: int) -> bool:
        """Queue again, as the same row, a job whose worker was killed while it downloaded.

        At most `limit` times per job, and never one asked to cancel; False when it is not taken
        back (the caller marks it interrupted). Its progress and log continue; the download resumes
        from the part files the killed worker left (docs/on-disk-layout.md).
        """
        with transaction.atomic():
            taken = UpgradeJob.objects.filter(
                pk=self.pk, status__in=JobStatus.ACTIVE, cancel_requested=False, restarts__lt=limit
            ).update(restarts=models.F("restarts") + 1)
            if not taken:
                return False
            self.refresh_from_db(fields=["restarts"])
            self._update(status=JobStatus.QUEUED, phase=JobPhase.QUEUED, message=self.RESUMED_MESSAGE)
            self.enqueue()
        return True

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
        asked = False
        if not cancelled:
            running = UpgradeJob.objects.filter(pk=self.pk, status=JobStatus.RUNNING, cancel_requested=False)
            asked = bool(running.update(cancel_requested=True))
        for child in self.children.filter(status__in=JobStatus.ACTIVE):
            child.cancel(by)
        self.refresh_from_db()
        if cancelled:
            self.new_log_entries = self.write_log(JobMessage.cancelled(note))
        elif asked:
            self.new_log_entries = self.write_log(
                [(JobMessage.Kind.MESSAGE, f"{note}: stopping at the next safe point")]
            )
        if cancelled or asked:
            job_changed.send(sender=UpgradeJob, job=self, fields=("status", "message", "log"))
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
                    for rest in children[1:]:
                        if cls.objects.filter(pk=rest.pk, status=JobStatus.QUEUED).update(
                            status=JobStatus.CANCELLED, message=note, finished_at=timezone.now()
                        ):
                            rest.write_log(JobMessage.cancelled(note))
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


# --- notifications (docs/notifications.md) --------------------------------------------------------


class NotificationTarget(models.Model):
    """Where notifications go: one Apprise URL. The URL holds secrets (tokens, passwords): it is shown
    masked everywhere (`masked_url`) and only written, never read back, by the admin, the API and the
    settings page."""

    label = models.CharField(
        max_length=100, blank=True, help_text="A name for people, e.g. \u201cops ntfy\u201d."
    )
    url = models.CharField(
        "Apprise URL",
        max_length=notify.MAX_URL_LENGTH,
        help_text="e.g. ntfys://ntfy.sh/topic, slack://T../B../X.., "
        "mailtos://user:pass@host?to=ops@example.com, jsons://hooks.example.com/path",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering: ClassVar = ["pk"]
        verbose_name = "notification URL"

    def __str__(self) -> str:
        return f"{self.label} ({self.masked_url})" if self.label else self.masked_url

    @property
    def masked_url(self) -> str:
        return notify.masked(self.url)

    def clean(self) -> None:
        try:
            self.url = notify.check_url(self.url)
        except notify.NotifyError as exc:
            raise ValidationError({"url": str(exc)}) from exc
        if NotificationTarget.objects.exclude(pk=self.pk).filter(url=self.url).exists():
            raise ValidationError({"url": "This URL is in the list already."})

    @classmethod
    def send_test(cls, targets: list[NotificationTarget]) -> list[tuple[NotificationTarget, notify.Outcome]]:
        """Send a test message now to each target; what happened, per target (the "send test" button).

        Runs in the caller's request, bounded by PORTAL_NOTIFY_TEST_TIMEOUT: the operator waits for
        the answer. Events never go this way (the notification task sends them).
        """
        link = settings.PORTAL_BASE_URL.rstrip("/") + "/settings/"
        outcomes = notify.send(
            {str(target.pk): target.url for target in targets},
            title="Backend Portal: test message",
            body=f"This URL receives Backend Portal's notifications.\n{link}",
            kind="info",
            timeout=settings.PORTAL_NOTIFY_TEST_TIMEOUT,
        )
        return [(target, outcomes[str(target.pk)]) for target in targets]

    @classmethod
    def seed_from_settings(cls) -> list[NotificationTarget]:
        """PORTAL_NOTIFY_URLS gives the initial list, once: the first time it is set. Afterwards the
        stored list wins (a URL removed in the admin does not come back at the next start)."""
        if not settings.PORTAL_NOTIFY_URLS:
            return []
        row = PortalSettings.load()
        made: list[NotificationTarget] = []
        with transaction.atomic():
            if PortalSettings.objects.select_for_update().get(pk=row.pk).notify_urls_seeded:
                return []
            for url in settings.PORTAL_NOTIFY_URLS:
                try:
                    clean = notify.check_url(url)
                except notify.NotifyError:
                    continue  # reported by the system check, without the URL
                target, created = cls.objects.get_or_create(url=clean)
                if created:
                    made.append(target)
            PortalSettings.objects.filter(pk=row.pk).update(notify_urls_seeded=True)
        return made


class NotificationEvent(models.Model):
    """Something operators are told about, recorded once: `key` is unique, so however many checks,
    ticks, processes or replicas see the same thing, one row (and one message) comes of it."""

    class Kind(models.TextChoices):
        UPGRADE_AVAILABLE = "upgrade_available", "upgrade available"
        OPERATION_FAILED = "operation_failed", "upgrade or rollback failed"
        NODE_OFFLINE = "node_offline", "node offline"
        DRIFT = "drift", "nodes drifted"
        CHECK_FAILING = "check_failing", "check failing"
        GALLERY_FAILING = "gallery_failing", "gallery cannot be synced"

    KEY_LENGTH: ClassVar = 500

    kind = models.CharField(max_length=20, choices=Kind.choices)
    key = models.CharField(max_length=KEY_LENGTH, unique=True, help_text="What makes it the same event.")
    severity = models.CharField(max_length=10, default="warning", help_text="info, warning or failure")
    title = models.CharField(max_length=300, help_text="What happened.")
    where = models.CharField(max_length=500, blank=True, help_text="The node(s).")
    why = models.TextField(blank=True)
    link = models.CharField(max_length=1000, blank=True)
    backend = models.ForeignKey(Backend, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    job = models.ForeignKey(UpgradeJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    message = models.ForeignKey(
        "NotificationMessage",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="events",
        help_text="The message it went out in; empty while it waits for the digest window.",
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering: ClassVar = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return self.title

    @classmethod
    def record(
        cls, kind: str, key: str, *, title: str, severity: str = "warning", **fields: Any
    ) -> NotificationEvent | None:
        """Record an event unless its key is known; the new row, or None when it was recorded before
        (by this process or another: the unique key decides)."""
        if len(key) > cls.KEY_LENGTH:
            key = key[: cls.KEY_LENGTH - 65] + ":" + hashlib.sha256(key.encode()).hexdigest()
        if cls.objects.filter(key=key).exists():
            return None
        values = {
            "title": title[:300],
            "where": str(fields.pop("where", ""))[:500],
            "why": str(fields.pop("why", ""))[:4000],
            "link": str(fields.pop("link", ""))[:1000],
            **fields,
        }
        try:
            with transaction.atomic():
                return cls.objects.create(kind=kind, key=key, severity=severity, **values)
        except IntegrityError:
            return None

    def text(self) -> str:
        """The event as a message says it: what, where, why, link."""
        lines = [self.title]
        if self.where:
            lines.append(f"Where: {self.where}")
        if self.why:
            lines.append(f"Why: {self.why}")
        if self.link:
            lines.append(self.link)
        return "\n".join(lines)


class NotificationMessage(models.Model):
    """What went out for one event, or for several that arrived within the digest window (one message)."""

    # A digest lists this many events in full; the rest are counted.
    DIGEST_LIMIT: ClassVar = 30
    SEVERITIES: ClassVar = ("info", "success", "warning", "failure")

    title = models.CharField(max_length=300)
    body = models.TextField()
    severity = models.CharField(max_length=10, default="warning")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering: ClassVar = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return self.title

    @classmethod
    def compose(cls, events: list[NotificationEvent], now: dt.datetime) -> NotificationMessage:
        """One event goes as itself; several as one digest naming each."""
        severity = max(
            (e.severity for e in events),
            key=lambda s: cls.SEVERITIES.index(s) if s in cls.SEVERITIES else 0,
        )
        if len(events) == 1:
            return cls.objects.create(
                title=events[0].title, body=events[0].text(), severity=severity, created_at=now
            )
        counts: dict[str, int] = {}
        for event in events:
            label = NotificationEvent.Kind(event.kind).label
            counts[label] = counts.get(label, 0) + 1
        summary = ", ".join(f"{count} {label}" for label, count in counts.items())
        parts = [event.text() for event in events[: cls.DIGEST_LIMIT]]
        if len(events) > cls.DIGEST_LIMIT:
            parts.append(
                f"... and {len(events) - cls.DIGEST_LIMIT} more: see the admin's notification events."
            )
        return cls.objects.create(
            title=f"Backend Portal: {len(events)} events ({summary})"[:300],
            body="\n\n".join(parts),
            severity=severity,
            created_at=now,
        )


class NotificationDelivery(models.Model):
    """One message's delivery to one URL: its attempts, the last error, when it was delivered."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        SENDING = "sending", "sending"
        RETRYING = "retrying", "failed, will retry"
        DELIVERED = "delivered", "delivered"
        FAILED = "failed", "failed"
        UNKNOWN = "unknown", "unknown (timed out, not resent)"

    WAITING: ClassVar = (Status.PENDING, Status.RETRYING)

    message = models.ForeignKey(NotificationMessage, on_delete=models.CASCADE, related_name="deliveries")
    target = models.ForeignKey(
        NotificationTarget, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries"
    )
    target_name = models.CharField(max_length=300, help_text="The URL, masked, when the message was made.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["-created_at", "-pk"]
        verbose_name_plural = "notification deliveries"
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["message", "target"], name="one_delivery_per_message_and_url"),
        ]

    def __str__(self) -> str:
        return f"{self.message} to {self.target_name}: {self.get_status_display()}"

    def record_outcome(self, outcome: notify.Outcome, now: dt.datetime) -> None:
        """After an attempt: delivered; unknown (a timeout: never resent); failed for good (after
        PORTAL_NOTIFY_ATTEMPTS attempts, or a URL Apprise cannot use); or retried later, each wait
        twice the one before (PORTAL_NOTIFY_RETRY_SECONDS, then doubling, at most an hour)."""
        self.last_error = "" if outcome.ok else outcome.detail
        self.next_attempt_at = None
        if outcome.ok:
            self.status, self.delivered_at = self.Status.DELIVERED, now
        elif outcome.result is notify.Result.UNKNOWN:
            self.status = self.Status.UNKNOWN
        elif outcome.result is notify.Result.INVALID or self.attempts >= settings.PORTAL_NOTIFY_ATTEMPTS:
            self.status = self.Status.FAILED
        else:
            self.status = self.Status.RETRYING
            wait = min(settings.PORTAL_NOTIFY_RETRY_SECONDS * 2 ** max(self.attempts - 1, 0), 3600)
            self.next_attempt_at = now + dt.timedelta(seconds=wait)
        self.save(update_fields=["status", "last_error", "next_attempt_at", "delivered_at"])


class JobMessage(models.Model):
    """One line of a job's log, stamped by the server when it was written: a message, an error or a
    change of status. The job page and the admin show them, also after a reload.

    Bounded per job (`UpgradeJob.write_log`): the first `HEAD` lines and the latest, `LIMIT` in all.
    """

    LIMIT = 200
    HEAD = 20
    TEXT_LIMIT = 2000

    class Kind(models.TextChoices):
        MESSAGE = "message", "message"
        ERROR = "error", "error"
        STATUS = "status", "status"

    job = models.ForeignKey(UpgradeJob, on_delete=models.CASCADE, related_name="log")
    at = models.DateTimeField(help_text="When the server wrote it.")
    phase = models.CharField(max_length=20, choices=JobPhase.choices, blank=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.MESSAGE)
    text = models.TextField()

    class Meta:
        ordering: ClassVar = ["job", "id"]
        indexes: ClassVar = [models.Index(fields=["job", "id"], name="jobmessage_job_id")]

    def __str__(self) -> str:
        return f"job {self.job_id} {self.at:%H:%M:%S} {self.text[:60]}"

    @classmethod
    def cancelled(cls, note: str) -> list[tuple[str, str]]:
        """The lines a job cancelled before it ran logs."""
        return [(cls.Kind.MESSAGE, note), (cls.Kind.STATUS, JobStatus.CANCELLED.label)]
