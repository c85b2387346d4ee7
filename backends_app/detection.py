"""Upgrade detection: which installed backends have something newer, and why. Never upgrades anything.

`find_upgrades()` looks at every current, concrete installed backend on every node (a meta backend reports
through its concrete one) and decides, per backend and node:

1. The tag still points at the installed image (one HEAD, digest equal): nothing to download. A
   higher declared version is still flagged, as an upgrade of metadata only (`METADATA_ONLY`):
   the upgrade then rewrites metadata.json and downloads nothing.
2. Both sides declare a version: the versions decide, ordered (PEP 440, else semantic versions, a
   leading ``v`` tolerated); a lower or equal gallery version is never an upgrade; plain inequality
   only when neither side parses. A gallery version where none was installed is an upgrade.
3. Otherwise the digest: the tag moved, so the new image and the installed one are resolved for the
   node's platform and their platform manifests compared; a rebuild for another architecture only
   is not an upgrade.

The tag HEADed first is the one the installed build came from (a mirror, a tag fallback), when the
gallery still offers it. A backend that is not an image (a local directory, an archive) is decided
from the gallery entry alone, with no request: the declared versions first, then an archive's
declared sha256 against the installed digest (`_decide_local`).

Pinned backends and targets held as bad are reported (reason ``pinned: ...`` / ``held: ...``) with
``upgrade_available`` False. A hold is released when something newer than the held target appears.
Under a gallery's enforced signature policy, a flagged build whose Sigstore signature does not
verify is reported as refused (``refused: ...``), not installable (docs/signatures.md).

Registry budget: one HEAD per distinct tag (deduplicated across backends and nodes) and, when nothing
moved, no GET at all. Signatures are looked at only for a build found to be an upgrade under an
enforced policy: a resolve when its platform manifest is not known yet, the referrers lookup (one or
two GETs) and two GETs per bundle. Lookups run on a thread pool (``PORTAL_REGISTRY_CONCURRENCY``)
sharing one registry client; the threads do no ORM work. Results are written afterwards in one
short transaction. See docs/upgrades.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import logging
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from backends_app import metrics, oci, sources
from backends_app.models import (
    REFUSED_PREFIX,
    Backend,
    Gallery,
    InstalledVersion,
    JobPhase,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)
from backends_app.oci import signatures
from backends_app.registry import client_from_settings, trusted_root_from_settings
from backends_app.versions import compare_versions

log = logging.getLogger(__name__)

# Seconds between two progress writes on the job row (a check of 500 backends writes a handful).
PROGRESS_INTERVAL = 0.5
#: How a reason says the upgrade only rewrites metadata.json (the build installed is the one offered).
METADATA_ONLY = "metadata only: no download"


class CheckCancelled(Exception):
    """The check job was cancelled while it ran; nothing was written."""


# --- digests --------------------------------------------------------------------------------------


def short_digest(digest: str) -> str:
    """``sha256:0123456789ab..`` for reasons and messages."""
    if not digest:
        return "(unknown)"
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}.." if hexpart else digest


# --- results --------------------------------------------------------------------------------------


@dataclass
class BackendCheck:
    """The verdict for one installed backend on one node."""

    ROW_KEYS: ClassVar[tuple[str, ...]] = (
        "name",
        "node",
        "installed_version",
        "installed_digest",
        "available_version",
        "available_digest",
        "upgrade_available",
        "reason",
        "pinned",
        "held",
        "refused",
        "error",
        "note",
    )

    backend_id: int
    node_id: int
    installed_id: int
    name: str
    node: str
    installed_version: str
    installed_digest: str
    available_version: str = ""
    available_digest: str = ""
    upgrade_available: bool = False
    reason: str = ""
    """Why it is flagged (or ``pinned: ...`` / ``held: ...``); empty when there is nothing to do."""
    note: str = ""
    """Why an apparent change is not an upgrade (lower version, other platform), for people."""
    pinned: bool = False
    held: bool = False
    refused: bool = False
    """The build is newer but its signature does not satisfy the gallery's enforced policy."""
    error: str = ""
    decided: bool = False
    """False when an error prevented any verdict: the backend's previous check result stands."""
    release_hold: bool = False
    source: str = ""
    """The reference whose tag was looked at (the primary, or the mirror that answered)."""
    available_manifest: str = ""
    """The available build's platform manifest digest, when the check resolved it."""

    def as_row(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.ROW_KEYS}


@dataclass
class CheckReport:
    """What one check found: one `BackendCheck` per installed backend and node."""

    results: list[BackendCheck] = field(default_factory=list)
    gallery_errors: list[str] = field(default_factory=list)
    requested_by: str = ""
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    request_counts: dict[str, int] = field(default_factory=dict)
    """Registry requests the check made, by HTTP method (HEAD, GET)."""
    rate_limited: list[RateLimited] = field(default_factory=list)
    """The registries that answered HTTP 429 during the check, and how far they slowed it."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per result with the keys of `BackendCheck.ROW_KEYS`, for tables and JSON."""
        return [result.as_row() for result in self.results]

    @property
    def upgrades(self) -> list[BackendCheck]:
        """Flagged, not pinned, not held: what an automatic upgrade may take."""
        return [r for r in self.results if r.upgrade_available]

    @property
    def errors(self) -> list[BackendCheck]:
        return [r for r in self.results if r.error]

    @property
    def outcome(self) -> str:
        """succeeded; partial when some backends could not be checked; failed when none could."""
        errors = len(self.errors)
        if errors and errors == len(self.results):
            return JobStatus.FAILED
        return JobStatus.PARTIAL if errors else JobStatus.SUCCEEDED

    @property
    def node_count(self) -> int:
        return len({r.node for r in self.results})

    def summary(self) -> str:
        """``checked 12 backends: 2 upgrades available, 1 error`` (plus pinned, held, galleries)."""
        count = len(self.results)
        where = f" on {self.node_count} nodes" if self.node_count > 1 else ""
        parts = [_plural(len(self.upgrades), "upgrade") + " available"]
        pinned = sum(1 for r in self.results if r.pinned)
        held = sum(1 for r in self.results if r.held)
        refused = sum(1 for r in self.results if r.refused)
        if pinned:
            parts.append(f"{pinned} pinned")
        if held:
            parts.append(f"{held} held")
        if refused:
            parts.append(f"{refused} refused (signature)")
        parts.append(_plural(len(self.errors), "error"))
        text = f"checked {_plural(count, 'backend')}{where}: {', '.join(parts)}"
        for limited in self.rate_limited:
            text += f"; {limited}"
        if self.gallery_errors:
            text += (
                f"; {_plural(len(self.gallery_errors), 'gallery', 'galleries')} could not be synced "
                "(their last good data was used)"
            )
        return text


@dataclass(frozen=True)
class RateLimited:
    """One registry that rate-limited a check (HTTP 429): the check slowed down for it."""

    host: str
    responses: int
    """HTTP 429 answers during the check."""
    in_flight: int
    """The fewest requests in flight the check was slowed to for this host."""
    gave_up: int = 0
    """Lookups that failed because the host answered nothing but 429 for too long."""

    def __str__(self) -> str:
        text = (
            f"registry {self.host} rate-limited us (HTTP 429 x {self.responses}): slowed to "
            f"{_plural(self.in_flight, 'request')} in flight"
        )
        if self.gave_up:
            text += f", then gave up on {_plural(self.gave_up, 'request')} it kept refusing"
        return text


def _rate_limited(
    before: dict[str, oci.RateLimitStats], after: dict[str, oci.RateLimitStats]
) -> list[RateLimited]:
    """The hosts that answered 429 between two snapshots of a client's `rate_limits()`."""
    found = []
    for host, now in sorted(after.items()):
        then = before.get(host)
        responses = now.throttled - (then.throttled if then else 0)
        if responses:
            gave_up = now.gave_up - (then.gave_up if then else 0)
            found.append(RateLimited(host, responses, now.lowest, gave_up))
    return found


def _plural(count: int, word: str, plural: str = "") -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


# --- what is checked: plain data, no ORM ----------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    installed_id: int
    backend_id: int
    node_id: int
    name: str
    node: str
    platform: str
    installed_version: str
    installed_digest: str
    gallery_version: str
    chain: tuple[str, ...]
    """Image references to HEAD, in order: the installed source first (see `_targets`)."""
    pinned: bool
    held_version: str
    held_digest: str
    held_reason: str
    gone: bool
    signature_policy: signatures.SignaturePolicy
    kind: str = sources.IMAGE
    """What the gallery's uri names: an image, a local path or a URL (`sources.kind_of`)."""
    gallery_sha256: str = ""
    archive: bool = False
    """The uri names an archive (a URL, or a local file rather than a directory)."""


@dataclass
class _Head:
    """The outcome of the HEAD of one tag (first source of the chain that answered)."""

    chain: tuple[str, ...] = ()
    source: str = ""
    digest: str = ""
    error: str = ""


@dataclass
class _Lookup:
    """The outcome of one platform resolve."""

    manifest_digest: str = ""
    version: str = ""
    error: str = ""
    not_found: bool = False


def _node_filter(nodes: Iterable[Node | str] | None) -> Q:
    """Installed rows on the given nodes (Node rows or names); every node when None."""
    if nodes is None:
        return Q()
    wanted = list(nodes)
    return Q(node__in=[n.pk for n in wanted if isinstance(n, Node)]) | Q(
        node__name__in=[n for n in wanted if isinstance(n, str)]
    )


_TARGET_FIELDS = (
    "pk",
    "backend_id",
    "node_id",
    "backend__name",
    "node__name",
    "node__platform",
    "version",
    "digest",
    "backend__version",
    "backend__uri",
    "backend__mirrors",
    "backend__pinned",
    "backend__held_version",
    "backend__held_digest",
    "backend__held_reason",
    "backend__gone",
    "uri",
    "backend__sha256",
    "backend__gallery__name",
    "backend__gallery__signature_mode",
    *(f"backend__gallery__{name}" for name in Gallery.VERIFICATION_FIELDS.values()),
)


def _targets(nodes: Iterable[Node | str] | None) -> list[_Target]:
    """The current concrete installed backends, as plain data (read in one query, no instances)."""
    rows = (
        InstalledVersion.objects.filter(
            _node_filter(nodes), state=InstalledVersion.State.CURRENT, is_meta=False, backend__isnull=False
        )
        .order_by("node__name", "name")
        .values_list(*_TARGET_FIELDS)
    )
    targets = []
    strict = settings.PORTAL_REQUIRE_SIGNATURES
    for (
        pk,
        backend_id,
        node_id,
        name,
        node,
        platform,
        version,
        digest,
        gallery_version,
        uri,
        mirrors,
        pinned,
        held_version,
        held_digest,
        held_reason,
        gone,
        installed_uri,
        gallery_sha256,
        gallery,
        signature_mode,
        *verification,
    ) in rows:
        block = signatures.Verification(**dict(zip(Gallery.VERIFICATION_FIELDS, verification, strict=True)))
        kind = sources.kind_of(uri) if uri else sources.IMAGE
        chain = Backend.chain_for(uri, mirrors)
        if kind == sources.IMAGE:
            # Compared with the source the installed build came from (a mirror, a tag fallback),
            # when the gallery still offers it; the others follow in the gallery's order.
            chain = [ref for ref in chain if sources.kind_of(ref) == sources.IMAGE]
            if installed_uri in chain:
                chain = [installed_uri, *(ref for ref in chain if ref != installed_uri)]
        targets.append(
            _Target(
                installed_id=pk,
                backend_id=backend_id,
                node_id=node_id,
                name=name,
                node=node,
                platform=platform,
                installed_version=version,
                installed_digest=digest,
                gallery_version=gallery_version,
                chain=tuple(chain) if kind == sources.IMAGE else (),
                pinned=pinned,
                held_version=held_version,
                held_digest=held_digest,
                held_reason=held_reason,
                gone=gone,
                signature_policy=signatures.SignaturePolicy.effective(
                    signature_mode, block, gallery=gallery, strict=strict
                ),
                kind=kind,
                gallery_sha256=gallery_sha256,
                archive=kind == sources.URL or sources.is_archive_name(uri),
            )
        )
    return targets


# --- network work (threads; no ORM) ---------------------------------------------------------------


def _host_of(chain: tuple[str, ...]) -> str:
    try:
        return oci.parse_reference(chain[0]).api_host if chain else ""
    except oci.OCIError:
        return ""


def _head_first(client: oci.RegistryClient, chain: tuple[str, ...]) -> _Head:
    """HEAD the tag; on failure the mirrors in order. One HEAD when the primary answers."""
    if not chain:
        return _Head(chain=chain, error="no image reference in the gallery entry")
    errors = []
    for ref in chain:
        try:
            return _Head(chain=chain, source=ref, digest=client.head_digest(ref))
        except oci.OCIError as exc:
            error = str(exc)
        except Exception as exc:  # a surprise in one lookup must not stop the others
            log.exception("check: HEAD %s failed unexpectedly", ref)
            error = f"unexpected error: {exc!r}"
        errors.append(f"{ref}: {error}" if len(chain) > 1 else error)
    return _Head(chain=chain, error="; ".join(errors))


def _resolve(client: oci.RegistryClient, ref: str, platform: str) -> _Lookup:
    try:
        resolved = client.resolve(ref, platform=platform)
    except oci.NotFound as exc:
        return _Lookup(error=str(exc), not_found=True)
    except oci.OCIError as exc:
        return _Lookup(error=str(exc))
    except Exception as exc:  # a surprise in one lookup must not stop the others
        log.exception("check: resolving %s failed unexpectedly", ref)
        return _Lookup(error=f"unexpected error: {exc!r}")
    return _Lookup(manifest_digest=resolved.manifest_digest, version=resolved.version or "")


def _at_digest(ref: str, digest: str) -> str:
    """The tag's repository pinned to `digest` (``repo:tag@sha256:...``): resolving it needs no HEAD."""
    try:
        return str(oci.parse_reference(ref).with_digest(digest))
    except oci.OCIError:
        return f"{ref}@{digest}"  # resolve() reports the bad digest as this target's error


# --- deciding (pure) ------------------------------------------------------------------------------


def _needs_platform_compare(target: _Target, head: _Head) -> bool:
    """The tag moved and the versions do not decide: compare the platform manifests."""
    if head.error or not head.digest or head.digest == target.installed_digest:
        return False
    if not target.installed_digest:
        return False
    return _version_verdict(target) is None


def _version_verdict(target: _Target) -> int | None:
    """What the declared versions say (see `compare_versions`), or None when they cannot decide."""
    if not target.gallery_version:
        return None
    if not target.installed_version:
        return 1
    return compare_versions(target.installed_version, target.gallery_version)


def _decide(target: _Target, head: _Head, new: _Lookup | None, old: _Lookup | None) -> BackendCheck:
    result = BackendCheck(
        backend_id=target.backend_id,
        node_id=target.node_id,
        installed_id=target.installed_id,
        name=target.name,
        node=target.node,
        installed_version=target.installed_version,
        installed_digest=target.installed_digest,
        available_version=target.gallery_version,
        available_digest=head.digest,
        error=head.error,
        source=head.source,
    )
    if target.gone:
        result.decided = True
        result.available_version = ""
        result.note = "no longer in its gallery: nothing to upgrade to"
        return result
    reason = ""
    verdict = _version_verdict(target)
    if head.digest and head.digest == target.installed_digest:
        # The tag points at exactly the installed image: nothing would change on disk, but a
        # higher declared version is recorded by rewriting metadata.json (an upgrade without
        # a download).
        result.decided = True
        result.available_version = target.gallery_version or target.installed_version
        if verdict != 1:
            return result
        reason = (
            f"version {target.installed_version or '(none)'} -> {target.gallery_version} "
            f"({METADATA_ONLY}: the tag still points at the installed image)"
        )
    elif verdict is not None:
        result.decided = True
        if verdict > 0:
            reason = f"version {target.installed_version or '(none)'} -> {target.gallery_version}"
        elif verdict < 0:
            result.note = (
                f"gallery version {target.gallery_version} is lower than installed "
                f"{target.installed_version}: not an upgrade"
            )
        elif head.digest:
            result.note = (
                f"rebuilt in the registry: new digest {short_digest(head.digest)} under the same "
                f"version {target.gallery_version} (not an upgrade: the version did not change)"
            )
    elif head.error:
        return result  # no verdict possible: the previous result stands
    elif not target.installed_digest:
        result.decided = True
        reason = f"installed digest unknown; the tag points at {short_digest(head.digest)}"
    else:
        assert new is not None and old is not None
        if new.version and not result.available_version:
            result.available_version = new.version
        result.available_manifest = new.manifest_digest
        if new.error:
            result.error = new.error
            return result
        result.decided = True
        if old.not_found:
            reason = (
                f"tag moved: {short_digest(target.installed_digest)} -> {short_digest(head.digest)} "
                "(the installed image is no longer in the registry)"
            )
        elif old.error:
            result.error = old.error
            result.decided = False
            return result
        elif new.manifest_digest == old.manifest_digest:
            result.note = (
                f"tag moved to {short_digest(head.digest)}, but the {target.platform} image is "
                "unchanged (a rebuild for other platforms)"
            )
        else:
            reason = (
                f"new build for {target.platform}: {short_digest(old.manifest_digest)} -> "
                f"{short_digest(new.manifest_digest)}"
            )
    return _flag(result, target, reason)


def _archive_digest(target: _Target) -> str:
    """The gallery's sha256 as a digest (``sha256:<hex>``), for an archive backend that declares one."""
    declared = target.gallery_sha256.strip().lower().removeprefix("sha256:")
    return f"sha256:{declared}" if target.archive and declared else ""


def _decide_local(target: _Target) -> BackendCheck:
    """The verdict for a backend that is not an image (a directory, an archive): from the gallery
    entry alone, no request. The declared versions decide first, as for images; an archive's
    sha256 decides when they cannot. A directory without a declared version has nothing to
    compare (its tree is not read again)."""
    expected = _archive_digest(target)
    result = BackendCheck(
        backend_id=target.backend_id,
        node_id=target.node_id,
        installed_id=target.installed_id,
        name=target.name,
        node=target.node,
        installed_version=target.installed_version,
        installed_digest=target.installed_digest,
        available_version=target.gallery_version,
        available_digest=expected,
        decided=True,
    )
    if target.gone:
        result.available_version = ""
        result.note = "no longer in its gallery: nothing to upgrade to"
        return result
    verdict = _version_verdict(target)
    reason = ""
    if verdict == 1:
        reason = f"version {target.installed_version or '(none)'} -> {target.gallery_version}"
        if expected and expected == target.installed_digest:
            reason += f" ({METADATA_ONLY}: the archive's sha256 is the installed one)"
    elif verdict is not None and verdict < 0:
        result.note = (
            f"gallery version {target.gallery_version} is lower than installed "
            f"{target.installed_version}: not an upgrade"
        )
    elif verdict == 0:
        if expected and expected != target.installed_digest:
            result.note = (
                f"the archive's sha256 changed but the declared version is still {target.gallery_version}"
            )
    elif expected:
        if not target.installed_digest:
            reason = f"installed digest unknown; the gallery's archive is {short_digest(expected)}"
        elif expected != target.installed_digest:
            reason = (
                f"archive sha256 changed: {short_digest(target.installed_digest)} -> {short_digest(expected)}"
            )
    else:
        result.note = "no declared version or sha256 in the gallery: nothing to compare with"
    return _flag(result, target, reason)


def _flag(result: BackendCheck, target: _Target, reason: str) -> BackendCheck:
    """Flag `result` for `reason`, unless the target is held as bad or the backend pinned."""
    if not reason:
        return result
    held = _matches_hold(target, result.available_version, result.available_digest)
    if held:
        result.held = True
        target_text = result.available_version or short_digest(result.available_digest)
        result.reason = f"held: {target_text} ({target.held_reason or 'marked bad'})"
    elif target.held_version or target.held_digest:
        result.release_hold = _newer_than_hold(target, result.available_version)
        result.reason = reason
        result.upgrade_available = True
    else:
        result.reason = reason
        result.upgrade_available = True
    if target.pinned:
        result.pinned = True
        result.upgrade_available = False
        result.reason = f"pinned: {reason}"
    return result


def _matches_hold(target: _Target, version: str, digest: str) -> bool:
    """The available target is the one held as bad (its digest, or its version when no digest)."""
    if target.held_digest and digest:
        return digest == target.held_digest
    if target.held_version and version:
        return version == target.held_version
    return bool(target.held_digest) and not digest and not target.held_version


def _newer_than_hold(target: _Target, version: str) -> bool:
    """Something other than the held target is available; release the hold unless it is older."""
    if target.held_version and version:
        order = compare_versions(target.held_version, version)
        if order is not None and order < 0:
            return False
    return True


# --- the check ------------------------------------------------------------------------------------


def find_upgrades(
    *,
    nodes: Iterable[Node | str] | None = None,
    requested_by: str = "",
    sync_galleries: bool = True,
    client: oci.RegistryClient | None = None,
    job: UpgradeJob | None = None,
) -> CheckReport:
    """`_find_upgrades`, timed for /metrics (portal_check_duration_seconds) whatever its outcome:
    every check, by a job, the schedule or the command line, comes through here."""
    started, outcome = time.monotonic(), str(JobStatus.FAILED)
    try:
        report = _find_upgrades(
            nodes=nodes, requested_by=requested_by, sync_galleries=sync_galleries, client=client, job=job
        )
        outcome = report.outcome
        return report
    except CheckCancelled:
        outcome = JobStatus.CANCELLED
        raise
    finally:
        metrics.record_check(outcome, time.monotonic() - started)


def _find_upgrades(
    *,
    nodes: Iterable[Node | str] | None = None,
    requested_by: str = "",
    sync_galleries: bool = True,
    client: oci.RegistryClient | None = None,
    job: UpgradeJob | None = None,
) -> CheckReport:
    """Check every installed concrete backend (on `nodes`, default all) and record the verdicts.

    `sync_galleries` first syncs the galleries the installed backends come from (a gallery that
    fails keeps its last good data and is reported). `client` lets callers share or count registry
    requests; by default one is made from the settings. `job` receives progress. Raises
    `CheckCancelled` if the job is cancelled meanwhile (nothing is written then). A check that
    ends is recorded as the portal's last check (`PortalSettings.record_check`), whoever asked.
    """
    report = CheckReport(requested_by=requested_by, started_at=timezone.now())
    if sync_galleries:
        report.gallery_errors = _sync_galleries(nodes)
    targets = _targets(nodes)
    own_client = client is None
    registry = client or client_from_settings()
    counts_before, limits_before = registry.request_counts, registry.rate_limits()
    if job is not None:
        job.set_phase(JobPhase.RESOLVING, f"checking {_plural(len(targets), 'backend')}")
    try:
        verdicts = _look_up(registry, targets, _progress(job, len(targets)))
        _check_signatures(registry, verdicts)
    finally:
        counts_after, limits_after = registry.request_counts, registry.rate_limits()
        if own_client:
            registry.close()
    report.request_counts = {
        method: counts_after.get(method, 0) - counts_before.get(method, 0)
        for method in counts_after
        if counts_after.get(method, 0) - counts_before.get(method, 0)
    }
    report.rate_limited = _rate_limited(limits_before, limits_after)
    for limited in report.rate_limited:
        log.warning("check: %s", limited)
    report.results = _record(verdicts, full=nodes is None)
    report.finished_at = timezone.now()
    PortalSettings.record_check(finished_at=report.finished_at, requested_by=requested_by)
    return report


def _sync_galleries(nodes: Iterable[Node | str] | None) -> list[str]:
    """Sync the enabled galleries of the installed backends; return the failures' summaries."""
    installed = InstalledVersion.objects.filter(
        _node_filter(nodes), state=InstalledVersion.State.CURRENT, backend__isnull=False
    )
    galleries = Gallery.objects.filter(enabled=True, pk__in=installed.values("backend__gallery")).order_by(
        "name"
    )
    errors = []
    for gallery in galleries:
        result = gallery.sync()
        if not result.ok:
            log.warning("check: %s", result.summary())
            errors.append(result.summary())
    return errors


def _progress(job: UpgradeJob | None, total: int) -> Callable[[int], None]:
    """A callback for the main thread: progress on the job row, throttled; cancellation."""
    next_write = [0.0]

    def report(done: int) -> None:
        if job is None:
            return
        now = time.monotonic()
        if done < total and now < next_write[0]:
            return
        next_write[0] = now + PROGRESS_INTERVAL
        job.set_progress(done, total, f"checked {done} of {_plural(total, 'backend')}")
        if done < total and UpgradeJob.objects.filter(pk=job.pk, cancel_requested=True).exists():
            raise CheckCancelled("cancelled while checking")

    return report


def _look_up(
    client: oci.RegistryClient, targets: list[_Target], progress: Callable[[int], None]
) -> list[tuple[_Target, BackendCheck]]:
    """All registry work, on a bounded pool: HEAD each distinct tag, resolve only what moved.

    Lookups are deduplicated: one HEAD per distinct reference chain, one resolve per (reference,
    platform). The main thread hands out the work and collects it; the threads only talk HTTP.
    """
    by_chain: dict[tuple[str, ...], list[int]] = {}
    for index, target in enumerate(targets):
        # Not offered any more, or not an image: nothing to look up.
        if not target.gone and target.kind == sources.IMAGE:
            by_chain.setdefault(target.chain, []).append(index)
    heads: dict[tuple[str, ...], _Head] = {}
    lookups: dict[tuple[str, str], _Lookup] = {}  # (reference, platform) -> outcome
    compares: dict[int, tuple[tuple[str, str], tuple[str, str]]] = {}  # target -> (new, old) keys
    waiting: dict[tuple[str, str], list[int]] = {}  # lookup in flight -> targets waiting for it
    done = len(targets) - sum(len(indexes) for indexes in by_chain.values())
    progress(done)
    workers = max(1, settings.PORTAL_REGISTRY_CONCURRENCY)
    # One tag per registry host goes first, alone: the first contact settles the scheme and the
    # auth token, which the other requests to that host then share (one token GET, not eight).
    later: dict[str, list[tuple[str, ...]]] = {}
    for chain in by_chain:
        later.setdefault(_host_of(chain), []).append(chain)
    # Completed lookups come back through a queue (O(1) each; `futures.wait` is O(pending) a call).
    finished: queue.SimpleQueue[tuple[str, Any, concurrent.futures.Future[Any]]] = queue.SimpleQueue()
    in_flight = 0
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="check") as pool:

        def submit(kind: str, key: Any, work: Callable[..., Any], *args: Any) -> None:
            nonlocal in_flight
            future = pool.submit(work, client, *args)
            in_flight += 1
            future.add_done_callback(lambda f: finished.put((kind, key, f)))

        def need(index: int, key: tuple[str, str]) -> None:
            if key in lookups:
                return
            if key not in waiting:
                waiting[key] = []
                submit("resolve", key, _resolve, *key)
            waiting[key].append(index)

        try:
            for host, chains in later.items():
                submit("first", host, _head_first, chains.pop(0))
            while in_flight:
                kind, key, future = finished.get()
                in_flight -= 1
                if kind == "first":  # a host's first tag answered: the others may go
                    for chain in later.pop(key, []):
                        submit("head", chain, _head_first, chain)
                if kind in ("first", "head"):
                    head = future.result()
                    heads[head.chain] = head
                    for index in by_chain[head.chain]:
                        target = targets[index]
                        if not _needs_platform_compare(target, head):
                            done += 1
                            continue
                        # Resolve the digest the HEAD saw (not the tag, which may move again).
                        keys = compares[index] = (
                            (_at_digest(head.source, head.digest), target.platform),
                            (_at_digest(head.source, target.installed_digest), target.platform),
                        )
                        for lookup_key in keys:
                            need(index, lookup_key)
                        if all(k in lookups for k in keys):
                            done += 1
                else:
                    lookups[key] = future.result()
                    for index in waiting.pop(key, []):
                        if all(k in lookups for k in compares[index]):
                            done += 1
                progress(done)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    verdicts = []
    for index, target in enumerate(targets):
        if target.kind != sources.IMAGE:
            verdicts.append((target, _decide_local(target)))
            continue
        compared = compares.get(index)
        new, old = (lookups[compared[0]], lookups[compared[1]]) if compared else (None, None)
        verdicts.append((target, _decide(target, heads.get(target.chain, _Head()), new, old)))
    return verdicts


def _check_signatures(client: oci.RegistryClient, verdicts: list[tuple[_Target, BackendCheck]]) -> None:
    """Under an enforced signature policy, mark flagged builds whose signature does not verify as
    refused: reported, not flagged, so no automatic upgrade takes them (the install would refuse
    them anyway, after the check). One verification per distinct build and policy, on a pool; the
    threads only talk HTTP and verify.
    """
    pending: dict[tuple[Any, ...], list[BackendCheck]] = {}
    for target, result in verdicts:
        if result.upgrade_available and target.signature_policy.enforced and target.kind == sources.IMAGE:
            key = (
                result.source,
                result.available_digest,
                result.available_manifest,
                target.platform,
                target.signature_policy,
            )
            pending.setdefault(key, []).append(result)
    if not pending:
        return
    root: list[Any] = []  # loaded once, in this thread, by the first verification that needs it

    def trusted_root() -> Any:
        if not root:
            try:
                root.append(trusted_root_from_settings())
            except signatures.SignatureRejected as exc:
                root.append(exc)
        if isinstance(root[0], signatures.SignatureRejected):
            raise root[0]
        return root[0]

    if any(key[4].verification is not None for key in pending):
        with contextlib.suppress(signatures.SignatureRejected):
            trusted_root()
    workers = max(1, settings.PORTAL_REGISTRY_CONCURRENCY)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="signatures") as pool:
        futures = {pool.submit(_verify_available, client, key, trusted_root): key for key in pending}
        for future in concurrent.futures.as_completed(futures):
            problem = future.result()
            if problem is None:
                continue
            for result in pending[futures[future]]:
                target_text = result.available_version or short_digest(result.available_digest)
                result.upgrade_available = False
                result.refused = True
                result.reason = f"{REFUSED_PREFIX}{target_text}: {problem}"


def _verify_available(
    client: oci.RegistryClient, key: tuple[Any, ...], trusted_root: Callable[[], Any]
) -> signatures.SignatureRejected | None:
    """Why a build (`key`: source, digest, its platform manifest if known, platform, policy) cannot be
    installed under its policy, or None if it can."""
    source, digest, manifest_digest, platform, policy = key
    try:
        if not manifest_digest and policy.verification is not None:
            manifest_digest = client.resolve(_at_digest(source, digest), platform=platform).manifest_digest
        signatures.apply_policy(client, source, manifest_digest or digest, policy, trusted_root)
    except signatures.SignatureRejected as exc:
        return exc
    except oci.OCIError as exc:
        return signatures.SignatureRejected("lookup_failed", str(exc))
    except Exception as exc:  # a surprise in one verification must not stop the check
        log.exception("check: verifying the signature of %s failed unexpectedly", source)
        return signatures.SignatureRejected("lookup_failed", f"unexpected error: {exc!r}")
    return None


# --- recording --------------------------------------------------------------------------------------

_RESULT_FIELDS = [
    "latest_digest",
    "available_version",
    "upgrade_available",
    "upgrade_reason",
    "last_error",
    "held_version",
    "held_digest",
    "held_reason",
    "check_note",
]


def _record(verdicts: list[tuple[_Target, BackendCheck]], *, full: bool) -> list[BackendCheck]:
    """Write the verdicts onto the Backend rows in one short transaction; returns the results.

    A result whose installed row changed while the check ran (an upgrade finished meanwhile) is
    dropped: the next check decides it. A full check (all nodes) also clears flags left on
    backends that are no longer installed anywhere.
    """
    now = timezone.now()
    with transaction.atomic():
        current = dict(
            (pk, (version, digest))
            for pk, version, digest in InstalledVersion.objects.filter(
                pk__in=[t.installed_id for t, _ in verdicts], state=InstalledVersion.State.CURRENT
            ).values_list("pk", "version", "digest")
        )
        results = [
            result
            for target, result in verdicts
            if current.get(target.installed_id) == (target.installed_version, target.installed_digest)
        ]
        by_backend: dict[int, list[BackendCheck]] = {}
        for result in results:
            by_backend.setdefault(result.backend_id, []).append(result)
        stored = {
            values[0]: values[1:]
            for values in Backend.objects.filter(pk__in=list(by_backend)).values_list("pk", *_RESULT_FIELDS)
        }
        changed, checked = [], []
        for backend_id, group in by_backend.items():
            if backend_id not in stored:
                continue
            backend = Backend(pk=backend_id, **dict(zip(_RESULT_FIELDS, stored[backend_id], strict=True)))
            if _apply(backend, group):
                checked.append(backend_id)
            if tuple(getattr(backend, name) for name in _RESULT_FIELDS) != stored[backend_id]:
                changed.append(backend)
        # Usually nothing but the time changed: one UPDATE for all of them. Rows whose verdict did
        # change are updated in groups of equal values (Django's bulk_update spends ~2 ms of CPU
        # a row building its CASE expressions).
        groups: dict[tuple[Any, ...], list[int]] = {}
        for backend in changed:
            groups.setdefault(tuple(getattr(backend, name) for name in _RESULT_FIELDS), []).append(backend.pk)
        for values, pks in groups.items():
            Backend.objects.filter(pk__in=pks).update(**dict(zip(_RESULT_FIELDS, values, strict=True)))
        Backend.objects.filter(pk__in=checked).update(last_checked_at=now)
        if full:
            Backend.objects.filter(upgrade_available=True).exclude(
                installed__state=InstalledVersion.State.CURRENT
            ).update(upgrade_available=False, upgrade_reason="")
    return results


def _apply(backend: Backend, group: list[BackendCheck]) -> bool:
    """One backend's verdicts on its nodes folded onto its row (flagged if any node is).

    Returns whether any node got a verdict (then the backend counts as checked now).
    """

    def joined(pairs: list[tuple[str, str]]) -> str:
        # One node, or the same text on every node: the text; else each node says its own.
        texts = {text for _, text in pairs}
        if len(group) == 1 or (len(texts) == 1 and len(pairs) == len(group)):
            return texts.pop()
        return "; ".join(f"{node}: {text}" for node, text in pairs)

    errors = [(r.node, r.error) for r in group if r.error]
    backend.last_error = joined(errors)[:10000] if errors else ""
    decided = [r for r in group if r.decided]
    if not decided:
        return False  # every node failed before a verdict: the previous result stands
    notes = [(r.node, r.note) for r in decided if r.note]
    backend.check_note = joined(notes)[:500] if notes else ""
    flagged = [r for r in decided if r.upgrade_available]
    reported = flagged or [r for r in decided if r.pinned or r.held or r.refused]
    backend.upgrade_available = bool(flagged)
    backend.upgrade_reason = joined([(r.node, r.reason) for r in reported])[:500] if reported else ""
    if reported and all(r.refused for r in reported):
        # One prefix for the whole, however many nodes: Backend.status reads it.
        texts = [(r.node, r.reason.removeprefix(REFUSED_PREFIX)) for r in reported]
        backend.upgrade_reason = (REFUSED_PREFIX + joined(texts))[:500]
    first = (reported or decided)[0]
    backend.available_version = first.available_version
    backend.latest_digest = first.available_digest
    if any(r.release_hold for r in decided):
        backend.held_version = backend.held_digest = backend.held_reason = ""
    return True
