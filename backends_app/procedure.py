"""Install, upgrade, roll back and uninstall backends: the one place where backends change on disk.

Every operation runs as an `UpgradeJob` and follows the journal protocol of docs/on-disk-layout.md:
the new tree is downloaded and verified in the state directory, swapped in with one atomic
`renameat2(RENAME_EXCHANGE)`, health-checked where it lives, and only then confirmed. Until it is
confirmed a crash rolls back to the old tree (see `reconcile`); from then on it rolls forward. The
rows in the database are always re-derived from what is on disk (`record_disk_state`), so they
agree with it whatever step was interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backends_app import gallery as gallery_index
from backends_app import oci, sources, versions
from backends_app.disk import fsops, layout
from backends_app.disk.errors import LayoutError
from backends_app.disk.health import health_check
from backends_app.disk.journal import Journal, JournalRecord
from backends_app.models import (
    EXTERNAL_GALLERY,
    Backend,
    InstalledVersion,
    JobKind,
    JobPhase,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)
from backends_app.oci import signatures
from backends_app.registry import client_from_settings, trusted_root_from_settings

log = logging.getLogger(__name__)

# Free space asked for before a download: the compressed size (while it streams) plus the tree it
# unpacks to, estimated from the compressed size, plus a fixed margin.
UNPACK_RATIO = 3.0
SPACE_MARGIN = 64 * 1024 * 1024
# How often a running job looks at its row for a cancel request.
CANCEL_POLL_SECONDS = 1.0


class ProcedureError(Exception):
    """An operation failed cleanly: the message says why; the backend is as it was."""


class Cancelled(ProcedureError):
    """The job was cancelled before its backend was touched."""


class RolledBack(ProcedureError):
    """The new version failed its health check and the previous one was put back."""


class NotEnoughSpace(ProcedureError):
    """The free space check before a download refused it (what was downloaded before is kept)."""


class SignatureRefused(ProcedureError):
    """The image's signature does not satisfy its gallery's enforced policy; nothing was touched."""


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process when PORTAL_CRASH_AT names `name`.

    A real SIGKILL, as a power cut or an OOM kill would deliver, at a named step of the procedure.
    """
    if os.environ.get("PORTAL_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Operation:
    """Everything one running job needs: its rows, its directories, its journal and registry client."""

    job: UpgradeJob
    backend: Backend
    node: Node
    settings: PortalSettings
    backends: Path
    state: layout.StateDirs
    journal: Journal
    client: oci.RegistryClient
    observer: Callable[[UpgradeJob], None] | None = None
    _next_cancel_poll: float = 0.0

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def live(self) -> Path:
        return self.backends / self.name

    def phase(self, phase: str, message: str = "") -> None:
        self.job.set_phase(phase, message)
        if self.observer:
            self.observer(self.job)

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.job.set_progress(done, total, message)
        if self.observer:
            self.observer(self.job)

    def checkpoint(self, name: str, *, cancellable: bool = True) -> None:
        """A named step boundary: crash injection, and (before the swap) a cancel request."""
        crash_point(name)
        if cancellable and time.monotonic() >= self._next_cancel_poll:
            self._next_cancel_poll = time.monotonic() + CANCEL_POLL_SECONDS
            if UpgradeJob.objects.filter(pk=self.job.pk, cancel_requested=True).exists():
                raise Cancelled("cancelled before the backend was touched")

    def health_command(self) -> tuple[str | None, float]:
        """The health-check command and its timeout: the gallery entry's, else the settings'.

        A command from a gallery runs code on every node as the portal's user, so it is taken only
        from galleries the server's operator configured (PORTAL_GALLERIES, the command line), never
        from one added or changed through the web (the admin or the API).
        """
        spec = {} if self.backend.gallery.set_through_web else (self.backend.health_check or {})
        command = spec.get("command")
        if isinstance(command, list):
            command = shlex.join(command)
        command = command or self.settings.health_check_command or None
        return command, float(spec.get("timeout") or self.settings.health_check_timeout)


def perform(job: UpgradeJob, observer: Callable[[UpgradeJob], None] | None = None) -> str:
    """Carry out a started install, upgrade, rollback or uninstall job; returns its closing message.

    Raises `Cancelled`, `RolledBack` or another `ProcedureError` (and the `oci`, `layout` and `OSError`
    errors of the steps) with the backend as it was; `jobs.run` turns each into the job's end state.
    `observer` is called with the job after each change of phase or progress (the commands draw
    their progress bar with it).
    """
    if job.backend is None:
        raise ProcedureError(f"job {job.pk} names no backend (its gallery entry was deleted)")
    node = job.node or Node.local()
    state = layout.StateDirs(node.state_path)
    operation = Operation(
        job=job,
        backend=job.backend,
        node=node,
        settings=PortalSettings.load(),
        backends=Path(node.backends_path),
        state=state,
        journal=Journal(state.journal_path),
        client=client_from_settings(node.platform),
        observer=observer,
    )
    steps: dict[str, Callable[[Operation], str]] = {
        JobKind.INSTALL: install,
        JobKind.UPGRADE: install,
        JobKind.ROLLBACK: rollback,
        JobKind.UNINSTALL: uninstall,
    }
    try:
        try:
            operation.backends.mkdir(parents=True, exist_ok=True)
            operation.state.require_usable(operation.backends)
            operation.state.ensure()
            return steps[job.kind](operation)
        except BaseException:
            _discard_leftovers(operation)  # before the job is seen to end: its space is free again
            raise
    finally:
        operation.journal.close()
        operation.client.close()


def _discard_leftovers(op: Operation) -> None:
    """Free the disk space a failed job took, so the next install is not refused for want of it.

    A swap that fails is undone by moving the staged tree to the trash, which otherwise only the
    next reconcile empties. Only this job's own trees go: its staging directories that no
    unfinished journal record names (after a recovery that failed, reconcile needs them) and the
    trash entries made from them. Live and kept versions are never under either path, and the
    trash entries of other jobs are left to them.
    """
    token = f"job-{op.job.pk}"
    try:
        named = {Path(record.staging) for record in op.journal.pending() if record.staging}
        candidates: list[Path] = []
        if op.state.staging_root.is_dir():
            candidates += [parent / token for parent in op.state.staging_root.iterdir()]
        if op.state.trash.is_dir():
            candidates += [entry for entry in op.state.trash.iterdir() if entry.name.startswith(f"{token}.")]
        for path in candidates:
            if path not in named and (path.exists() or path.is_symlink()):
                fsops.remove_tree(path)
    except (OSError, LayoutError) as exc:
        log.warning("job %s: could not remove what it left on disk: %s", op.job.pk, exc)


def describe_failure(exc: BaseException) -> str:
    """An operator's one-line account of why an operation failed."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


# --- install and upgrade --------------------------------------------------------------------------


def install(op: Operation) -> str:
    """Install or upgrade a backend; for a meta backend, its concrete backend and then the meta."""
    if not op.backend.is_meta:
        return install_concrete(op, op.backend)
    concrete = _concrete_for(op.backend, op.node)
    summary = install_concrete(op, concrete)
    _write_meta(op, concrete)
    return f"{summary}; {op.backend.name} points to {concrete.name}"


def _concrete_for(meta: Backend, node: Node) -> Backend:
    target = meta.concrete_name_for(node.capability)
    if not target:
        raise ProcedureError(f"meta backend {meta.name} has no build for capability {node.capability!r}")
    try:
        return Backend.objects.visible().get(gallery=meta.gallery, name=target)
    except Backend.DoesNotExist:
        raise ProcedureError(
            f"meta backend {meta.name} points to {target}, which its gallery lacks"
        ) from None


class IntegrityRequired(ProcedureError):
    """PORTAL_REQUIRE_BACKEND_INTEGRITY is on and the archive's gallery entry declares no sha256."""


@dataclass
class Fetched:
    """What a source provided into the staging directory, or found unchanged."""

    source: str
    """The uri actually used (the gallery's uri, a mirror, or a tag fallback), as written."""
    digest: str
    """An image's tag digest, an archive's ``sha256:<hex>``, a directory's tree digest."""
    version: str = ""
    """The version the source declares (an image's annotation), if any."""
    unchanged: bool = False
    """The source holds exactly the installed build: nothing was staged, only metadata changes."""
    notes: list[str] = field(default_factory=list)
    """Warnings for the job's closing message (no sha256, a source that failed first)."""
    signature: signatures.SignatureOutcome | None = None
    """What the gallery's signature policy found (images only; None: not checked)."""


def install_concrete(op: Operation, backend: Backend) -> str:
    """Download, verify and stage `backend`, swap it in, health-check it, keep the previous tree.

    The source is an image, a local directory or an archive (`sources.kind_of`), tried in LocalAI's
    order (`Backend.source_chain`). An upgrade (not forced) whose source still holds the installed
    build (same digest) changes only metadata.json (`_rewrite_metadata`): no download, no swap.
    """
    job, name = op.job, backend.name
    live = op.backends / name
    staging = op.state.staging_root / name / f"job-{job.pk}"
    # A forced upgrade downloads again whatever is installed (a repair); another one whose source
    # still holds the installed build only rewrites metadata.
    installed = _read_live_metadata(op, name) if job.kind == JobKind.UPGRADE and not job.force else None
    # The journal's lock is held from here to the end: it is what tells reconcile this is alive.
    op.journal.begin(job.kind, name, job.pk, live=live, staging=staging, step="staging")
    try:
        op.phase(JobPhase.RESOLVING, f"resolving {sources.shown(backend.uri)}")
        chain = backend.source_chain
        if not chain:
            raise ProcedureError(f"{name} has no uri in its gallery")
        staging.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if backend.source_kind == sources.IMAGE:
            fetched = _fetch_image(
                op,
                backend,
                [ref for ref in chain if sources.kind_of(ref) == sources.IMAGE],
                staging,
                installed,
            )
        else:
            fetched = _fetch_other(op, backend, chain, staging, installed)
        version = backend.version or fetched.version
        job._update(to_version=version, to_digest=fetched.digest, source=fetched.source)
        if fetched.unchanged and installed is not None:
            return _rewrite_metadata(op, backend, installed, version)
        op.checkpoint("downloaded")

        staging.chmod(0o755)  # it becomes the live directory; LocalAI may run as another user
        layout.write_metadata(
            staging,
            layout.BackendMetadata(
                name=name,
                alias=backend.alias,
                gallery_url=gallery_index.public_url(backend.gallery.url),  # never credentials
                installed_at=layout.format_rfc3339(timezone.now()),
                version=version,
                uri=fetched.source,  # what was installed, not only the primary (LocalAI writes the primary)
                digest=fetched.digest,
                extra=_signature_record(fetched.signature),
            ),
        )
        precheck = health_check(staging)
        if not precheck.ok:
            raise ProcedureError(
                f"what {sources.shown(fetched.source)} holds is not a backend: {precheck.detail}"
            )
        fsops.sync_tree(staging)
        op.checkpoint("staged")
        # The staged tree holds every layer now: the downloads have served, and their space is
        # given back before the swap (a job resumed after a crash from here downloads again).
        _clear_blobs(op, name)
    except BaseException as exc:
        # Nothing live was touched: drop what was staged, end the journal.
        fsops.remove_tree(staging)
        op.journal.clear(name)
        if not _worth_resuming(exc):
            _clear_blobs(op, name)
        raise
    _swap_in(op, backend, source=staging, source_is_kept=False)
    notes = [*fetched.notes, fetched.signature.summary()] if fetched.signature else fetched.notes
    shown_notes = f" ({'; '.join(note for note in notes if note)})" if any(notes) else ""
    return (
        f"{name} {version or fetched.digest[:19]} installed from {sources.shown(fetched.source)}{shown_notes}"
    )


def _worth_resuming(exc: BaseException) -> bool:
    """Whether a failed install keeps its downloaded parts for a retry: only when the network
    failed it, or the space check refused to go on (dropping them would only make it ask for
    more). A cancel, a disk filling up, a bad or hostile image leave nothing to resume from."""
    if isinstance(exc, NotEnoughSpace):
        return True
    if isinstance(exc, oci.AllSourcesFailed):
        return all(isinstance(error, oci.RegistryUnavailable) for _, error in exc.errors)
    return isinstance(exc, oci.RegistryUnavailable)


def _clear_blobs(op: Operation, name: str) -> None:
    """Empty backend `name`'s blob directory (installed, or cancelled: nothing left to resume)."""
    try:
        oci.BlobStore.remove(op.state.blob_dir(name))
    except OSError as exc:
        log.warning("%s: could not empty its blob directory: %s", name, exc)


def _fetch_image(
    op: Operation, backend: Backend, refs: list[str], staging: Path, installed: layout.BackendMetadata | None
) -> Fetched:
    """Resolve the first reference that answers; pull it unless it is the installed image."""
    job = op.job
    resolved = op.client.resolve_first(refs, platform=op.node.platform)
    # Known now; corrected after the pull if a mirror ends up serving another build.
    job._update(
        to_version=backend.version or resolved.version or "",
        to_digest=resolved.digest,
        source=resolved.source,
    )
    if installed is not None and installed.digest and resolved.digest == installed.digest:
        return Fetched(
            source=installed.uri or resolved.source,
            digest=resolved.digest,
            version=resolved.version or "",
            unchanged=True,
        )
    # The platform manifest the pull will fetch (it verifies every blob against it), checked
    # before a byte of it is downloaded; again after the pull if a mirror served another one.
    policy = backend.gallery.signature_policy()
    signature = _check_signature(op, backend, policy, resolved.source, resolved.manifest_digest)
    # The layers' part files (less what an interrupted pull left in the blob directory) and the
    # tree they unpack to: both are on the state directory's filesystem until the swap.
    blob_dir = op.state.blob_dir(backend.name)
    layout.mkdir_private(blob_dir.parent)
    layout.mkdir_private(blob_dir)
    store = oci.BlobStore(blob_dir)
    held = sum(min(store.held(layer.digest), layer.size) for layer in resolved.layers)
    to_download = max(0, resolved.total_compressed_size - held)
    tree = int(resolved.total_compressed_size * UNPACK_RATIO)
    try:
        fsops.ensure_free_space(
            op.state.root,
            to_download + tree,
            SPACE_MARGIN,
            parts=[("of layers to download", to_download), ("estimated unpacked tree", tree)],
        )
    except LayoutError as exc:
        raise NotEnoughSpace(str(exc)) from None
    op.checkpoint("resolved")

    op.phase(JobPhase.DOWNLOADING, f"downloading {resolved.source}")
    pulled = _pull(op, resolved, refs, staging, blob_dir)
    if (pulled.source, pulled.manifest_digest) != (resolved.source, resolved.manifest_digest):
        signature = _check_signature(op, backend, policy, pulled.source, pulled.manifest_digest)
    return Fetched(
        source=pulled.source, digest=pulled.digest, version=pulled.version or "", signature=signature
    )


def _fetch_other(
    op: Operation, backend: Backend, chain: list[str], staging: Path, installed: layout.BackendMetadata | None
) -> Fetched:
    """A backend whose uri is a local path or a URL: each source of the chain in order until one
    provides it. A hostile tree, a cancel or a missing sha256 under strict integrity stop at once."""
    errors: list[str] = []
    for uri in chain:
        kind = sources.kind_of(uri)
        try:
            if kind == sources.IMAGE:
                fetched = _fetch_image(op, backend, [uri], staging, installed)
            elif kind == sources.PATH:
                # The roots first: what exists outside them is none of a gallery's business.
                _local_source(op, backend, uri, "backend source")
                if os.path.isdir(uri):
                    fetched = _copy_directory(op, backend, uri, staging, installed)
                elif os.path.lexists(uri):
                    fetched = _fetch_archive(op, backend, uri, staging, installed)
                else:
                    raise sources.SourceError(f"{uri} does not exist")
            else:
                fetched = _fetch_archive(op, backend, uri, staging, installed)
        except (oci.UnsafeArchive, Cancelled, IntegrityRequired):
            raise
        except (sources.SourceError, oci.OCIError) as exc:
            log.warning("job %s: %s failed: %s", op.job.pk, sources.shown(uri), exc)
            errors.append(f"{sources.shown(uri)}: {exc}")
            fsops.remove_tree(staging)
            continue
        if errors:
            fetched.notes.append(f"tried first: {'; '.join(errors)}")
        return fetched
    raise ProcedureError(f"no source could provide {backend.name}: {'; '.join(errors)}")


def _local_source(op: Operation, backend: Backend, path: str, what: str) -> Path:
    """A local path a source may be read from: below `Node.source_roots` unless the command line
    named it, and never the state directory or a directory holding it (a copy into itself)."""
    if backend.source_trusted:
        real = Path(os.path.realpath(path))
    else:
        real = sources.confine(path, op.node.source_roots, what)
    state = Path(os.path.realpath(op.state.root))
    if real == state or real in state.parents or state in real.parents:
        raise sources.SourceError(f"{what} {path} holds or is inside the portal's state directory {state}")
    return real


def _progress(op: Operation, label: str) -> Callable[[int, int], None]:
    """A transfer's progress on the job row (at most every 0.2 s), and a crash and cancel point."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2 or (total and done >= total):
            last[0] = now
            op.progress(done, total, label)
        op.checkpoint("downloading")

    return report


def _free_for_writing(op: Operation) -> int:
    return max(0, fsops.free_bytes(op.state.root) - SPACE_MARGIN)


def _copy_directory(
    op: Operation, backend: Backend, uri: str, staging: Path, installed: layout.BackendMetadata | None
) -> Fetched:
    source = _local_source(op, backend, uri, "backend source")
    op.checkpoint("resolved")
    op.phase(JobPhase.DOWNLOADING, f"copying {source}")
    copied = sources.copy_tree(
        source,
        staging,
        label=str(source),
        progress=_progress(op, f"copying {source}"),
        free_bytes=_free_for_writing(op),
    )
    fetched = Fetched(source=uri, digest=copied.digest)
    if backend.sha256:
        fetched.notes.append("the gallery's sha256 does not apply to a directory and was not checked")
    if installed is not None and installed.digest == copied.digest:
        fsops.remove_tree(staging)
        fetched.unchanged = True
    return fetched


def _fetch_archive(
    op: Operation, backend: Backend, uri: str, staging: Path, installed: layout.BackendMetadata | None
) -> Fetched:
    declared = backend.sha256.strip()
    notes = []
    if not declared:
        if settings.PORTAL_REQUIRE_BACKEND_INTEGRITY:
            raise IntegrityRequired(
                f'strict integrity: backend "{backend.name}" has no SHA256 (gallery "{backend.gallery.name}")'
            )
        notes.append("no sha256 in the gallery: the archive was not verified")
    elif (
        installed is not None
        and installed.digest.lower() == f"sha256:{declared.lower().removeprefix('sha256:')}"
    ):
        return Fetched(source=installed.uri or uri, digest=installed.digest, unchanged=True)
    confined: list[Path] | None = None
    if sources.kind_of(uri) != sources.URL or uri.lower().startswith("file:"):
        path = sources.local_path(uri)
        _local_source(op, backend, str(path), "backend source")
        confined = None if backend.source_trusted else op.node.source_roots
    op.checkpoint("resolved")
    op.phase(JobPhase.DOWNLOADING, f"downloading {sources.shown(uri)}")
    download_path = staging.parent / f"{staging.name}.download"
    try:
        got = sources.download(
            uri,
            download_path,
            config=op.client.config,
            progress=_progress(op, f"downloading {sources.shown(uri)}"),
            free_bytes=_free_for_writing(op),
            confined_to=confined,
        )
        if declared:
            sources.check_sha256(got, declared, uri)  # before a single entry is extracted
        op.checkpoint("downloading")
        op.phase(JobPhase.DOWNLOADING, f"extracting {sources.shown(uri)}")
        sources.extract(download_path, staging, label=sources.shown(uri), free_bytes=_free_for_writing(op))
    finally:
        with contextlib.suppress(FileNotFoundError):
            download_path.unlink()
    return Fetched(source=uri, digest=f"sha256:{got.sha256}", notes=notes)


def _rewrite_metadata(
    op: Operation, backend: Backend, installed: layout.BackendMetadata, version: str
) -> str:
    """An upgrade whose source still holds the installed build: metadata.json alone is rewritten
    (new version and time, same uri and digest), in one atomic rename, under the journal."""
    name = backend.name
    op.phase(JobPhase.SWAPPING, "metadata only: no download")
    op.checkpoint("resolved", cancellable=False)
    metadata = layout.BackendMetadata(
        name=name,
        alias=backend.alias,
        gallery_url=gallery_index.public_url(backend.gallery.url),
        installed_at=layout.format_rfc3339(timezone.now()),
        version=version,
        uri=installed.uri,
        digest=installed.digest,
        extra=installed.extra,
    )
    layout.write_metadata(op.backends / name, metadata)
    op.checkpoint("metadata-written", cancellable=False)
    record_disk_state(op.node, [name], origin=_origin_for(op.job))
    backend.record_installed(version=version, digest=installed.digest)
    op.journal.clear(name)
    before = installed.version or "(no version)"
    return (
        f"{name} {before} -> {version or '(no version)'}: metadata only: no download "
        f"({sources.shown(installed.uri)} still holds the installed build {installed.digest[:19]})"
    )


def _check_signature(
    op: Operation, backend: Backend, policy: signatures.SignaturePolicy, source: str, digest: str
) -> signatures.SignatureOutcome:
    """Apply the gallery's signature policy to the image manifest `digest` from `source`.

    Enforced and not satisfied: `SignatureRefused`, saying why. Under warn the problem goes into
    the job's message and the install goes on.
    """
    if not policy.checks:
        return signatures.SignatureOutcome(status="skipped", digest=digest)
    op.phase(JobPhase.RESOLVING, f"verifying the signature of {digest[:19]}")
    try:
        outcome = signatures.apply_policy(op.client, source, digest, policy, trusted_root_from_settings)
    except signatures.SignatureRejected as exc:
        raise SignatureRefused(
            f"{backend.name} {digest[:19]} refused by the signature policy of gallery "
            f"{backend.gallery.name}: {exc}"
        ) from None
    if outcome.problem is not None:
        log.warning("job %s: %s: %s", op.job.pk, backend.name, outcome.summary())
        op.phase(JobPhase.RESOLVING, outcome.summary())
    return outcome


def _signature_record(outcome: signatures.SignatureOutcome | None) -> dict[str, Any]:
    """What metadata.json keeps of the signature check (nothing when none ran)."""
    record = outcome.to_json() if outcome is not None else None
    return {layout.SIGNATURE_KEY: record} if record else {}


def _pull(
    op: Operation, resolved: oci.Resolved, refs: list[str], staging: Path, blob_dir: Path
) -> oci.PullResult:
    """Pull the resolved image; if its source fails, the other references of the chain in order.

    The layers download into `blob_dir`, which outlives the job: a job that fails on the network
    (or a worker killed mid-download) leaves the parts it had, and the next pull resumes from
    them; a blob that fails its digest or holds a hostile archive is dropped by the client.
    """

    def progress(update: oci.PullProgress) -> None:
        op.progress(update.done, update.total, f"layer {update.layer_index + 1}/{update.layer_count}")
        op.checkpoint("downloading")

    try:
        return op.client.pull(resolved, staging, progress=progress, blob_dir=blob_dir)
    except (oci.UnsafeArchive, Cancelled):
        raise
    except oci.OCIError as first:
        others = [ref for ref in refs if ref != resolved.source]
        if not others:
            raise
        log.warning("pull from %s failed (%s); trying mirrors", resolved.source, first)
        return op.client.pull_first(
            others, staging, platform=op.node.platform, progress=progress, blob_dir=blob_dir
        )


def _swap_in(op: Operation, backend: Backend, *, source: Path, source_is_kept: bool) -> None:
    """Put `source` live, health-check it there, keep what it replaced. Journal begun by the caller.

    On a failed health check the previous tree goes back and the job ends as rolled back; the
    failed target is held so automatic upgrades skip it. Any other error on the way is recovered
    at once exactly as a crash would be, so the old version is live when the error is reported.
    """
    try:
        _swap_in_steps(op, backend, source=source, source_is_kept=source_is_kept)
    except BaseException:
        record = op.journal.read(backend.name)
        if record is not None:
            _recover(op.journal, op.state, record)
            record_disk_state(op.node, [backend.name])
        raise


def _swap_in_steps(op: Operation, backend: Backend, *, source: Path, source_is_kept: bool) -> None:
    job, name = op.job, backend.name
    live = op.backends / name
    kept = op.state.kept(name, _kept_label(job))
    had_previous = live.exists()
    op.phase(JobPhase.SWAPPING, f"swapping {name} in")
    if had_previous:
        op.journal.advance(name, "swapping", kept=kept)
        op.checkpoint("before-swap", cancellable=False)
        fsops.exchange(source, live)
    else:
        op.journal.advance(name, "moving-in")
        op.checkpoint("before-swap", cancellable=False)
        fsops.rename_noreplace(source, live)
    op.checkpoint("after-swap", cancellable=False)
    op.journal.advance(name, "swapped")
    op.checkpoint("swapped", cancellable=False)

    op.phase(JobPhase.HEALTH_CHECK, f"checking {name}")
    command, timeout = op.health_command()
    health = health_check(live, command, timeout, backends_path=op.backends)
    op.checkpoint("health-checked", cancellable=False)
    if not health.ok:
        _revert(op, name, source=source, had_previous=had_previous, source_is_kept=source_is_kept)
        backend.hold(
            version=job.to_version, digest=job.to_digest, reason=f"health check failed: {health.detail}"
        )
        record_disk_state(op.node, [name])
        if had_previous:
            raise RolledBack(f"health check failed, previous version restored: {health.detail}")
        raise ProcedureError(f"health check failed, not installed: {health.detail}")

    op.journal.advance(name, "confirmed")
    op.checkpoint("confirmed", cancellable=False)
    op.phase(JobPhase.CLEANUP, "keeping the previous version")
    if had_previous:
        fsops.rename_noreplace(source, kept)
    op.checkpoint("kept", cancellable=False)
    _prune_kept(op, name)
    op.checkpoint("pruned", cancellable=False)
    record_disk_state(op.node, [name], origin=_origin_for(job))
    if job.kind != JobKind.ROLLBACK:
        backend.record_installed(version=job.to_version, digest=job.to_digest)
    op.checkpoint("recorded", cancellable=False)
    op.journal.clear(name)
    op.checkpoint("cleared", cancellable=False)


def _revert(op: Operation, name: str, *, source: Path, had_previous: bool, source_is_kept: bool) -> None:
    """Undo a swap whose health check failed: the previous tree goes back live."""
    live = op.backends / name
    op.journal.advance(name, "reverting")
    op.checkpoint("reverting", cancellable=False)
    if had_previous:
        fsops.exchange(source, live)
    else:
        fsops.rename_noreplace(live, source)
    op.journal.advance(name, "reverted")
    op.checkpoint("reverted", cancellable=False)
    if not source_is_kept:
        _to_trash(op, source)
    op.journal.clear(name)
    op.state.empty_trash()


def _kept_label(job: UpgradeJob) -> str:
    # Labels sort by age: the newest kept version is the last one.
    return f"{timezone.now():%Y%m%dT%H%M%S}-job{job.pk}"


def _origin_for(job: UpgradeJob) -> str:
    return (
        InstalledVersion.Origin.ROLLBACK if job.kind == JobKind.ROLLBACK else InstalledVersion.Origin.GALLERY
    )


def _prune_kept(op: Operation, name: str) -> None:
    """Keep the newest `versions_kept` previous trees of `name`; the older ones go."""
    kept = op.state.kept_versions(name)
    surplus = kept[: max(0, len(kept) - op.settings.versions_kept)]
    for path in surplus:
        _to_trash(op, path)
    op.state.empty_trash()


def _to_trash(op: Operation, path: Path) -> None:
    if path.exists() or path.is_symlink():
        fsops.rename_noreplace(path, op.state.trash_slot(path.name))


def _write_meta(op: Operation, concrete: Backend) -> None:
    """Write the meta backend's directory: metadata.json alone, pointing at the concrete one.

    As LocalAI writes it: no alias, and the concrete's version (here the one installed, so it is
    refreshed by every upgrade, where LocalAI's goes stale).
    """
    meta = op.backend
    installed = _read_live_metadata(op, concrete.name)
    metadata = layout.BackendMetadata(
        name=meta.name,
        meta_backend_for=concrete.name,
        gallery_url=gallery_index.public_url(meta.gallery.url),
        installed_at=layout.format_rfc3339(timezone.now()),
        version=installed.version if installed else concrete.version,
    )
    live = op.backends / meta.name
    if live.is_dir():
        layout.write_metadata(live, metadata)  # one atomic rename of the file
    else:
        # Journaled like any operation, so a concurrent reconcile sees it alive and leaves its
        # staging directory alone, and a crash before the rename leaves nothing behind.
        staging = op.state.staging_root / meta.name / f"job-{op.job.pk}"
        op.journal.begin(op.job.kind, meta.name, op.job.pk, live=live, staging=staging, step="staging")
        try:
            staging = op.state.staging(meta.name, f"job-{op.job.pk}")
            layout.write_metadata(staging, metadata)
            op.checkpoint("meta-staged", cancellable=False)
            fsops.rename_noreplace(staging, live)
        except BaseException:
            fsops.remove_tree(staging)
            raise
        finally:
            op.journal.clear(meta.name)
    record_disk_state(op.node, [meta.name], origin=_origin_for(op.job))


# --- rollback and uninstall -----------------------------------------------------------------------


def rollback(op: Operation) -> str:
    """Put back the newest kept version older than the live one (`versions.is_older`, the rule
    `Backend.rollback_target_on` shows on the pages); the version rolled back from is kept and held.
    A kept version newer than the live one (what an earlier rollback left) is never put back here:
    that would be an upgrade."""
    backend = op.backend
    if backend.is_meta:
        backend = _installed_concrete(op)
    name = backend.name
    kept = op.state.kept_versions(name)
    if not kept:
        raise ProcedureError(f"{name} has no kept version to roll back to")
    current = _read_live_metadata(op, name)
    source, restored = _rollback_source(kept, current)
    if source is None or restored is None:
        raise ProcedureError(
            f"{name} has no kept version older than the live one "
            "(the kept ones are newer: an upgrade goes forward)"
        )
    op.job._update(to_version=restored.version, to_digest=restored.digest)
    op.journal.begin("rollback", name, op.job.pk, live=op.backends / name, staging=source, step="staging")
    try:
        op.checkpoint("staged")
    except BaseException:
        op.journal.clear(name)
        raise
    _swap_in(op, backend, source=source, source_is_kept=True)
    if current is not None:
        backend.hold(version=current.version, digest=current.digest, reason=f"rolled back by job {op.job.pk}")
    return f"{name} rolled back to {restored.version or restored.digest[:19]}"


def _rollback_source(
    kept: list[Path], current: layout.BackendMetadata | None
) -> tuple[Path | None, layout.BackendMetadata | None]:
    """The newest kept directory older than the live tree, with its metadata."""
    for path in reversed(kept):
        metadata = layout.read_metadata(path)
        if current is None or versions.is_older(
            metadata.version, metadata.installed_datetime, current.version, current.installed_datetime
        ):
            return path, metadata
    return None, None


def _installed_concrete(op: Operation) -> Backend:
    metadata = _read_live_metadata(op, op.backend.name)
    target = metadata.meta_backend_for if metadata else ""
    found = Backend.objects.visible().filter(gallery=op.backend.gallery, name=target).first()
    if not found:
        raise ProcedureError(f"meta backend {op.backend.name} points to {target or 'nothing'} on disk")
    return found


def _read_live_metadata(op: Operation, name: str) -> layout.BackendMetadata | None:
    try:
        return layout.read_metadata(op.backends / name)
    except layout.LayoutError:
        return None


def uninstall(op: Operation) -> str:
    """Remove a backend, its kept versions and any meta backend pointing at it (or, for a meta, its
    concrete backend). Each directory leaves the backends directory in one rename."""
    names = [op.backend.name]
    metadata = _read_live_metadata(op, op.backend.name)
    if metadata and metadata.is_meta:
        names.append(metadata.meta_backend_for)
    names += [
        entry.name
        for entry in layout.scan(op.backends)
        if entry.meta_backend_for in names and entry.name not in names
    ]
    op.phase(JobPhase.SWAPPING, f"removing {', '.join(names)}")
    for name in names:
        live = op.backends / name
        slot = op.state.trash_slot(name)
        op.journal.begin("uninstall", name, op.job.pk, live=live, trash=slot, step="removing")
        op.checkpoint("before-remove", cancellable=False)
        if live.exists() or live.is_symlink():
            fsops.rename_noreplace(live, slot)
        for kept in op.state.kept_versions(name):
            _to_trash(op, kept)
        op.checkpoint("removed", cancellable=False)
        op.journal.clear(name)
    record_disk_state(op.node, names)
    op.state.empty_trash()
    return f"uninstalled {', '.join(names)}"


# --- the database follows the disk ----------------------------------------------------------------


def _backend_for(metadata: layout.BackendMetadata | None, name: str) -> Backend | None:
    candidates = Backend.objects.visible().filter(name=name).select_related("gallery")
    if metadata and metadata.gallery_url:
        # Files written before credentials were kept apart may still carry them.
        written = gallery_index.public_url(metadata.gallery_url)
        exact = [b for b in candidates if b.gallery.url == written]
        if exact:
            return exact[0]
    elif metadata is not None:
        # No gallery: an install from a uri (LocalAI's install-external), if the portal made one.
        external = [b for b in candidates if b.gallery.name == EXTERNAL_GALLERY]
        if external:
            return external[0]
    return candidates.first()


def record_disk_state(node: Node, names: Iterable[str] | None = None, origin: str = "") -> list[str]:
    """Make the node's InstalledVersion rows say exactly what its disk holds.

    For each backend name (default: everything on disk and every name with rows), the live
    directory gives the current row and each kept directory a kept row; rows for trees that are no
    longer on disk go. Returns the problems found (corrupt metadata and the like), one per backend.
    """
    backends = Path(node.backends_path)
    state = layout.StateDirs(node.state_path)
    scanned = {entry.name: entry for entry in layout.scan(backends)}
    if names is None:
        wanted = set(scanned) | set(node.installed.values_list("name", flat=True))
        if state.kept_root.is_dir():
            wanted |= {p.name for p in state.kept_root.iterdir() if p.is_dir()}
    else:
        wanted = set(names)
    problems = []
    with transaction.atomic():
        for name in sorted(wanted):
            entry = scanned.get(name)
            rows = {row.path: row for row in node.installed.filter(name=name)}
            keep_paths: set[str] = set()
            if entry is not None and not entry.is_symlink:
                keep_paths.add(str(entry.path))
                problem = entry.problem
                if problem:
                    problems.append(f"{name}: {problem}")
                _upsert_row(
                    node,
                    name,
                    entry.path,
                    entry.metadata,
                    InstalledVersion.State.CURRENT,
                    problem,
                    origin,
                    rows,
                )
            for kept_dir in state.kept_versions(name) if (state.kept_root / name).is_dir() else []:
                try:
                    metadata: layout.BackendMetadata | None = layout.read_metadata(kept_dir)
                    problem = ""
                except layout.LayoutError as exc:
                    metadata, problem = None, str(exc)
                keep_paths.add(str(kept_dir))
                _upsert_row(node, name, kept_dir, metadata, InstalledVersion.State.KEPT, problem, "", rows)
            stale = [row.pk for path, row in rows.items() if path not in keep_paths]
            if stale:
                InstalledVersion.objects.filter(pk__in=stale).delete()
    return problems


def _signature_values(meta: layout.BackendMetadata) -> dict[str, Any]:
    """The InstalledVersion signature fields from what the install wrote into metadata.json.

    The file is ours to write but anyone with access to the directory can edit it: values of the
    wrong type read as "not checked".
    """
    record = meta.extra.get(layout.SIGNATURE_KEY)
    values: dict[str, Any] = {
        "signature": InstalledVersion.Signature.NOT_CHECKED,
        "signer_identity": "",
        "signer_issuer": "",
        "signed_at": None,
        "signature_note": "",
    }
    if not isinstance(record, dict) or not all(isinstance(v, (str, int)) for v in record.values()):
        return values

    def text(key: str, limit: int) -> str:
        return str(record.get(key) or "")[:limit]

    if record.get("status") == "verified":
        values.update(
            signature=InstalledVersion.Signature.VERIFIED,
            signer_identity=text("identity", 1000),
            signer_issuer=text("issuer", 500),
            signed_at=layout.parse_rfc3339(text("signed_at", 100)),
            signature_note=(
                f"image {text('digest', 19)}.., bundle {text('bundle', 19)}.., "
                f"log index {text('log_index', 20)}"
            ),
        )
    elif record.get("status") == "unverified":
        values.update(
            signature=InstalledVersion.Signature.UNVERIFIED,
            signature_note=f"{text('reason', 50)}: {text('detail', 440)}",
        )
    return values


def _upsert_row(
    node: Node,
    name: str,
    path: Path,
    metadata: layout.BackendMetadata | None,
    state: str,
    problem: str,
    origin: str,
    rows: dict[str, InstalledVersion],
) -> None:
    meta = metadata or layout.BackendMetadata(name=name)
    values = {
        "backend": _backend_for(metadata, meta.name if meta.is_meta else name),
        "state": state,
        "is_meta": meta.is_meta,
        "meta_backend_for": meta.meta_backend_for,
        "alias": meta.alias,
        "gallery_url": gallery_index.public_url(meta.gallery_url),
        "version": meta.version,
        "uri": meta.uri,
        "digest": meta.digest,
        "installed_at": meta.installed_datetime,
        "problem": problem[:500],
        **_signature_values(meta),
    }
    row = rows.get(str(path))
    if row is None and state == InstalledVersion.State.CURRENT:
        # The live directory's row keeps its identity (and origin) across upgrades.
        row = next((r for r in rows.values() if r.state == InstalledVersion.State.CURRENT), None)
        if row is not None:
            rows.pop(row.path, None)
    if row is None:
        if state == InstalledVersion.State.CURRENT:
            # Demote any other current row first (the unique constraint allows one).
            InstalledVersion.objects.filter(node=node, name=name, state=state).update(
                state=InstalledVersion.State.KEPT
            )
        InstalledVersion.objects.create(
            node=node, name=name, path=str(path), origin=origin or InstalledVersion.Origin.ADOPTED, **values
        )
        return
    changed = {key: value for key, value in values.items() if getattr(row, key) != value}
    if row.path != str(path):
        changed["path"] = str(path)
    if (
        origin
        and (row.digest != meta.digest or row.origin != origin)
        and state == InstalledVersion.State.CURRENT
    ):
        changed["origin"] = origin
    if changed:
        for key, value in changed.items():
            setattr(row, key, value)
        row.save()


# --- after a crash --------------------------------------------------------------------------------


@dataclass
class ReconcileReport:
    recovered: list[str]
    interrupted_jobs: list[int]
    problems: list[str]
    removed_leftovers: int

    def summary(self) -> str:
        parts = [
            f"{len(self.recovered)} interrupted operation(s) recovered",
            f"{len(self.interrupted_jobs)} job(s) marked interrupted",
            f"{self.removed_leftovers} leftover(s) removed",
        ]
        text = ", ".join(parts)
        if self.recovered:
            text += "\n" + "\n".join(f"  {line}" for line in self.recovered)
        if self.problems:
            text += "\nproblems on disk:\n" + "\n".join(f"  {line}" for line in self.problems)
        return text


def reconcile(node: Node | None = None, *, resume_downloads: bool = False) -> ReconcileReport:
    """Finish or undo every operation whose process died, then make the rows agree with the disk.

    Runs when a worker starts and by `manage.py backends reconcile`. An operation still running in
    another process (its journal lock held) is left alone. With `resume_downloads` (a worker
    starting, which will run the queue) an install or upgrade that died while it downloaded, its
    live backend untouched, is queued again as the same job (at most PORTAL_PULL_RESUME_ATTEMPTS
    times) and resumes from its part files; otherwise it is marked interrupted and its part files
    go. A blob directory is never removed as a leftover: only its files untouched for
    PORTAL_PULL_BLOB_MAX_AGE_DAYS are.
    """
    node = node or Node.local()
    state = layout.StateDirs(node.state_path)
    state.ensure()
    journal = Journal(state.journal_path)
    recovered: list[str] = []
    busy: set[str] = set()
    try:
        for record in journal.pending():
            if record.owner_alive:
                busy.add(record.backend)
                continue
            journal.take_over(record.backend)
            outcome = _recover(journal, state, record)
            if resume_downloads and _resume_download(record):
                outcome += f"; {UpgradeJob.RESUMED_MESSAGE}"
            else:
                _mark_interrupted(record.job_id, f"interrupted at step {record.step!r}: {outcome}")
                # Nothing will resume from its downloads: their space is free again.
                with contextlib.suppress(OSError, LayoutError):
                    oci.BlobStore.remove(state.blob_dir(record.backend))
            recovered.append(
                f"{record.backend}: {record.op} (job {record.job_id}) at {record.step!r}: {outcome}"
            )
    finally:
        journal.close()
    removed = 0
    named = {Path(r.staging) for r in journal.pending() if r.staging}
    max_age = settings.PORTAL_PULL_BLOB_MAX_AGE_DAYS * 86400.0
    if state.staging_root.is_dir():
        for parent in state.staging_root.iterdir():
            if parent.name in busy:
                continue
            for leftover in list(parent.iterdir()) if parent.is_dir() else []:
                if leftover.name == layout.BLOB_DIR_NAME and leftover.is_dir() and not leftover.is_symlink():
                    # Downloads a retry resumes from: only what nobody touched for max_age goes.
                    removed += oci.BlobStore.remove(leftover, max_age)
                elif leftover not in named:
                    fsops.remove_tree(leftover)
                    removed += 1
    removed += state.empty_trash()
    interrupted = []
    for job in UpgradeJob.objects.filter(node=node, status=JobStatus.RUNNING).select_related("backend"):
        if job.backend and job.backend.name in busy:
            continue
        _mark_interrupted(str(job.pk), "interrupted: its process stopped before it finished")
        interrupted.append(job.pk)
    problems = record_disk_state(node)
    return ReconcileReport(recovered, interrupted, problems, removed)


def _resume_download(record: JournalRecord) -> bool:
    """Queue again an install or upgrade whose worker died while it downloaded (the live backend
    untouched), at most PORTAL_PULL_RESUME_ATTEMPTS times per job; its pull resumes from the part
    files in the backend's blob directory."""
    if record.op not in (JobKind.INSTALL, JobKind.UPGRADE) or record.step != "staging":
        return False
    try:
        job = UpgradeJob.objects.select_related("node").get(pk=int(record.job_id))
    except (ValueError, UpgradeJob.DoesNotExist):
        return False
    return job.resume_after_restart(settings.PORTAL_PULL_RESUME_ATTEMPTS)


def _mark_interrupted(job_id: str, message: str) -> None:
    with contextlib.suppress(ValueError, UpgradeJob.DoesNotExist):
        job = UpgradeJob.objects.get(pk=int(job_id), status__in=JobStatus.ACTIVE)
        job.fail(message, status=JobStatus.INTERRUPTED)


def _recover(journal: Journal, state: layout.StateDirs, record: JournalRecord) -> str:
    """Bring one interrupted operation to a whole state, following docs/on-disk-layout.md."""
    name, step, op = record.backend, record.step, record.op
    live, staging, kept = Path(record.live), record.path("staging"), record.path("kept")

    def trash(path: Path | None) -> None:
        if path is not None and (path.exists() or path.is_symlink()):
            fsops.rename_noreplace(path, state.trash_slot(path.name))

    if op == "uninstall":
        if record.now_at("live") == "live":
            trash(live)
        for path in state.kept_versions(name):
            trash(path)
        journal.clear(name)
        return "removal finished"

    source_is_kept = op == "rollback"
    had_previous = bool(record.kept)  # an install onto an empty place records no kept path
    if step == "staging":
        if not source_is_kept:
            trash(staging)
        journal.clear(name)
        return "nothing was swapped; the previous version is in place"
    if step == "confirmed":
        # The new tree passed its health check live: roll forward.
        if (
            had_previous
            and staging is not None
            and staging.exists()
            and kept is not None
            and not kept.exists()
        ):
            fsops.rename_noreplace(staging, kept)
        journal.clear(name)
        return "the new version is in place"
    # Not confirmed: roll back. Was the new tree live when the process died?
    if step in ("swapping", "moving-in"):
        new_is_live = record.now_at("staging") == "live"
    elif step == "reverting":
        new_is_live = record.now_at("live") == "live"
    else:
        new_is_live = step == "swapped"
    if new_is_live:
        if staging is None:
            raise LayoutError(f"journal record of {name} at {step!r} names no staging directory")
        if step != "reverting":
            journal.advance(name, "reverting")
        if had_previous:
            fsops.exchange(staging, live)
        else:
            fsops.rename_noreplace(live, staging)
    journal.advance(name, "reverted")
    if not source_is_kept:
        trash(staging)
    journal.clear(name)
    return "rolled back; the previous version is in place" if had_previous else "install undone"
