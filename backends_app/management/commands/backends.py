"""`manage.py backends ...`: list, install, upgrade, roll back, uninstall, pin, scan, reconcile, publish.

The work runs in this process, in the foreground, as an UpgradeJob like any other (`--queue` hands it
to the workers instead). A terminal gets a progress bar; anything else gets plain progress lines.

The verbs LocalAI's `local-ai backends` has behave like it and print its lines (core/cli/backends.go):
`list` shows every gallery entry (` * gallery@name v1.2 (installed, upgrade available: 1.3)`,
` * ... (installed)`, ` - ...`); `upgrade` with no names checks, then upgrades everything upgradable
("All backends are up to date." when nothing is), and skips a named backend with no upgrade
("Backend <name>: no upgrade available") unless `--force`; "Backend <name> upgraded successfully",
"Failed to upgrade <name>: <error>", "Backend <name> uninstalled successfully". Unlike LocalAI, which
exits 0 when an upgrade fails, any operation that did not succeed makes the command exit 1, so
scripts and cron notice. See docs/operations.md.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from backends_app import detection, jobs, oci, procedure, registry
from backends_app.models import (
    Backend,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    UpgradeJob,
)

OPERATIONS = {
    "install": JobKind.INSTALL,
    "upgrade": JobKind.UPGRADE,
    "rollback": JobKind.ROLLBACK,
    "uninstall": JobKind.UNINSTALL,
}
# "Backend <name> <done> successfully", LocalAI's line for upgrade and uninstall.
DONE: dict[str, str] = {
    JobKind.INSTALL: "installed",
    JobKind.UPGRADE: "upgraded",
    JobKind.ROLLBACK: "rolled back",
    JobKind.UNINSTALL: "uninstalled",
}
UP_TO_DATE = "All backends are up to date."
NOTHING_TO_APPLY = "No upgrades to apply."


def backend_row(backend: Backend, installed: InstalledVersion | None) -> dict[str, Any]:
    """One backend as `list --json`, `upgrade --json` and `check --json` print it."""
    return {
        "name": backend.name,
        "gallery": backend.gallery.name,
        "node": installed.node.name if installed else None,
        "installed_version": installed.version if installed else None,
        "installed_digest": installed.digest if installed else None,
        "installed_at": installed.installed_at.isoformat() if installed and installed.installed_at else None,
        "available_version": backend.available_version or backend.version or None,
        "available_digest": backend.latest_digest or None,
        "upgrade_available": backend.upgrade_available,
        "reason": backend.upgrade_reason,
        "pinned": backend.pinned,
        "held": bool(backend.held_version or backend.held_digest),
        "problem": installed.problem if installed else "",
        "status": backend.status.state,
        "status_detail": backend.status.detail,
    }


class Command(BaseCommand):
    help = "Manage installed backends: list, install, upgrade, rollback, uninstall, pin, scan, reconcile."

    def add_arguments(self, parser: CommandParser) -> None:
        verbs = parser.add_subparsers(dest="verb", required=True)
        listing = verbs.add_parser(
            "list", help="Every gallery entry, marked installed or not, as LocalAI's `backends list` prints."
        )
        listing.add_argument(
            "--installed",
            action="store_true",
            help="Installed backends as a table: node, version, digest, install time, status, pin.",
        )
        listing.add_argument("--json", action="store_true", help="Print the installed backends as JSON.")
        listing.add_argument(
            "--all",
            action="store_true",
            help="With --installed or --json: add gallery backends not installed.",
        )
        listing.add_argument(
            "--check", action="store_true", help="Check for upgrades first (else: the last check's result)."
        )
        for verb in ("install", "rollback", "uninstall"):
            sub = verbs.add_parser(verb, help=f"{verb.capitalize()} a backend.")
            sub.add_argument("names", nargs="+", metavar="NAME", help="gallery name, or gallery@name")
            sub.add_argument("--queue", action="store_true", help="Hand the work to the workers.")
        upgrade = verbs.add_parser(
            "upgrade", help="Check, then upgrade the named backends, or (no names) every upgradable one."
        )
        upgrade.add_argument("names", nargs="*", metavar="NAME")
        upgrade.add_argument("--all", action="store_true", help="Every upgradable backend (as no names).")
        upgrade.add_argument("--dry-run", action="store_true", help="Say what would be upgraded, do nothing.")
        upgrade.add_argument("--json", action="store_true", help="Print the outcome as JSON.")
        upgrade.add_argument(
            "--force",
            action="store_true",
            help="Upgrade named backends even with no upgrade available (reinstall the latest), pinned too.",
        )
        upgrade.add_argument("--queue", action="store_true", help="Hand the work to the workers.")
        for verb in ("pin", "unpin"):
            sub = verbs.add_parser(verb, help=f"{verb.capitalize()} a backend.")
            sub.add_argument("names", nargs="+", metavar="NAME")
        verbs.add_parser("scan", help="Record what the backends directory holds (adopt LocalAI's).")
        verbs.add_parser("reconcile", help="Recover interrupted operations; make records match the disk.")
        check = verbs.add_parser("check", help="Check every installed backend for upgrades now.")
        check.add_argument("--json", action="store_true")
        publish = verbs.add_parser("publish", help="Push a backend directory as an OCI image.")
        publish.add_argument("directory")
        publish.add_argument("reference", help="registry/repository:tag")
        publish.add_argument("--version", dest="image_version", default=None)
        publish.add_argument(
            "--platform", action="append", default=None, help="os/arch; repeat for a multi-platform index"
        )

    def handle(self, *args: Any, verb: str, **options: Any) -> None:
        self.requested_by = f"cli:{getpass.getuser()}"
        getattr(self, f"handle_{verb}")(**options)

    # -- reading -------------------------------------------------------------------------------

    def handle_list(
        self,
        json: bool = False,
        all: bool = False,
        installed: bool = False,
        check: bool = False,
        **options: Any,
    ) -> None:
        if check:
            report = detection.find_upgrades(requested_by=self.requested_by)
            for failed in report.errors:
                self.stderr.write(f"{failed.name}: check failed: {failed.error}")
        if json or installed or all:
            self.list_installed(as_json=json, include_all=all)
        else:
            self.list_gallery()

    def list_gallery(self) -> None:
        """LocalAI's `backends list`: one line per gallery entry, marked when installed (on any node).

        "upgrade available" is the last check's verdict (`--check` checks first; LocalAI always does).
        """
        entries = (
            Backend.objects.visible()
            .filter(gone=False, gallery__enabled=True)
            .with_installations()
            .order_by("gallery__name", "position")
        )
        shown = 0
        for backend in entries:
            version = f" v{backend.version}" if backend.version else ""
            name = f"{backend.gallery.name}@{backend.name}{version}"
            if not backend.current_versions():
                self.stdout.write(f" - {name}")
            elif backend.upgrade_available:
                available = backend.available_version or "new build"
                self.stdout.write(f" * {name} (installed, upgrade available: {available})")
            else:
                self.stdout.write(f" * {name} (installed)")
            shown += 1
        if not shown:  # LocalAI prints nothing; a hint on stderr leaves stdout as LocalAI's
            self.stderr.write("no gallery entries: `manage.py gallery sync` fetches the galleries")

    def list_installed(self, *, as_json: bool, include_all: bool) -> None:
        """The installed backends, one row per node, with the status `Backend.status` decides."""
        rows = self.rows(include_all=include_all)
        if as_json:
            self.stdout.write(_json(rows))
            return
        if not rows:
            self.stdout.write("no backends installed (`backends install NAME` installs one)")
            return
        header = ("NAME", "NODE", "VERSION", "DIGEST", "INSTALLED AT", "STATUS", "PINNED")
        lines = [header]
        for row in rows:
            digest = (row["installed_digest"] or "").removeprefix("sha256:")[:12]
            state = row["status"].replace("_", " ")
            upgrade = f"{state}: {row['status_detail']}" if row["status_detail"] else state
            lines.append(
                (
                    row["name"],
                    row["node"] or "-",
                    row["installed_version"] or "-",
                    digest or "-",
                    (row["installed_at"] or "-")[:19],
                    upgrade,
                    "pinned" if row["pinned"] else "",
                )
            )
            if row["problem"]:
                lines.append(("", "", "", "", "", f"problem: {row['problem']}", ""))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        for line in lines:
            self.stdout.write(
                "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            )

    def rows(self, include_all: bool = False) -> list[dict[str, Any]]:
        rows = [
            backend_row(backend, row)
            for backend in Backend.objects.installed_on().with_installations()
            for row in backend.current_versions()
        ]
        orphans = InstalledVersion.objects.filter(state=InstalledVersion.State.CURRENT, backend=None)
        for row in orphans.select_related("node"):  # adopted directories that no gallery lists
            rows.append(
                {
                    "name": row.name,
                    "gallery": None,
                    "node": row.node.name,
                    "installed_version": row.version,
                    "installed_digest": row.digest,
                    "installed_at": row.installed_at.isoformat() if row.installed_at else None,
                    "available_version": None,
                    "available_digest": None,
                    "upgrade_available": False,
                    "reason": "not in any gallery",
                    "pinned": False,
                    "held": False,
                    "problem": row.problem,
                    "status": "not_in_gallery",
                    "status_detail": "",
                }
            )
        rows.sort(key=lambda row: (row["name"], row["node"]))
        if include_all:
            listed = {row["name"] for row in rows}
            for backend in Backend.objects.visible().select_related("gallery").exclude(name__in=listed):
                rows.append(backend_row(backend, None))
        return rows

    # -- operations ----------------------------------------------------------------------------

    def handle_install(self, names: list[str], queue: bool = False, **options: Any) -> None:
        self.operate(JobKind.INSTALL, names, queue=queue)

    def handle_rollback(self, names: list[str], queue: bool = False, **options: Any) -> None:
        self.operate(JobKind.ROLLBACK, names, queue=queue)

    def handle_uninstall(self, names: list[str], queue: bool = False, **options: Any) -> None:
        self.operate(JobKind.UNINSTALL, names, queue=queue)

    def handle_upgrade(
        self,
        names: list[str],
        all: bool = False,
        dry_run: bool = False,
        json: bool = False,
        force: bool = False,
        queue: bool = False,
        **options: Any,
    ) -> None:
        """LocalAI's `backends upgrade [name...]`: check first, then upgrade what the check flagged.

        No names (or `--all`): every upgradable backend. A named backend with nothing newer is skipped
        ("Backend <name>: no upgrade available") unless `force`; a named one that is pinned with
        something newer, or not installed, is refused. A backend the check could not reach counts
        as a failure (exit 1), as does any operation that did not succeed.
        """
        if names and all:
            raise CommandError("name the backends to upgrade, or pass --all (not both); neither means all")
        named = [self.lookup(name) for name in names]
        node = None if queue else Node.local()
        # A fresh look first (side-effect free), so "upgradable" means what the registries offer now.
        report = detection.find_upgrades(
            nodes=None if node is None else [node], requested_by=self.requested_by
        )
        unchecked = {result.backend_id: result for result in report.errors}
        for problem in report.gallery_errors:  # its last good index was used
            self.stderr.write(problem)
        for result in report.errors:
            self.stderr.write(f"{result.name}: check failed: {result.error}")
        upgradable = list(Backend.objects.upgradable(node).select_related("gallery").order_by("name"))
        targets, skipped = self.select_named(named, unchecked, force=force) if named else (upgradable, [])
        in_scope = {b.pk for b in named} if named else set(unchecked)
        chosen = {b.pk for b in targets}
        failed_checks = sorted(r.name for pk, r in unchecked.items() if pk in in_scope and pk not in chosen)
        if not targets and not failed_checks:
            if json:
                self.stdout.write(_json([_skipped_json(b) for b in skipped]))
            elif not upgradable and (not named or len(skipped) == len(named)):
                self.stdout.write(UP_TO_DATE)
            else:
                for backend in skipped:
                    self.stdout.write(f"Backend {backend.name}: no upgrade available")
                self.stdout.write(NOTHING_TO_APPLY)
            return
        if not json:
            for backend in skipped:
                self.stdout.write(f"Backend {backend.name}: no upgrade available")
        failures = [f"{name}: check failed" for name in failed_checks]
        if dry_run:
            self.show_dry_run(targets, as_json=json)
        else:
            jobs = self.operate(
                JobKind.UPGRADE, targets, queue=queue, force=force, quiet=json, failures=failures
            )
            if json:
                self.stdout.write(_json([*(_job_json(job) for job in jobs), *map(_skipped_json, skipped)]))
        if failures:
            raise CommandError(f"{len(failures)} backend(s) not upgraded: {'; '.join(failures)}")

    def select_named(
        self, named: list[Backend], unchecked: dict[int, Any], *, force: bool
    ) -> tuple[list[Backend], list[Backend]]:
        """The named backends to ask an upgrade of, and those skipped for having nothing newer.

        Asked: flagged by the check, or any with `force`; also those the verb will refuse with a
        reason worth an error (pinned with something newer, not installed). Neither: those the
        check could not reach (reported as failures by the caller).
        """
        targets, skipped = [], []
        for backend in named:
            backend.refresh_from_db()
            installed = backend.installed.filter(state=InstalledVersion.State.CURRENT).exists()
            if force or backend.upgrade_available or not installed:
                targets.append(backend)
            elif backend.pk in unchecked:
                continue
            elif backend.pinned and backend.upgrade_reason.startswith("pinned:"):
                targets.append(backend)
            else:
                skipped.append(backend)
        return targets, skipped

    def show_dry_run(self, targets: list[Backend], *, as_json: bool) -> None:
        rows = [
            backend_row(b, b.installed.filter(state=InstalledVersion.State.CURRENT).first()) for b in targets
        ]
        if as_json:
            self.stdout.write(_json(rows))
            return
        for row in rows:
            target = row["available_version"] or (row["available_digest"] or "")[:19] or "latest"
            self.stdout.write(f"would upgrade {row['name']}: {row['installed_version'] or '-'} -> {target}")

    def operate(
        self,
        kind: str,
        targets: list[Any],
        *,
        queue: bool,
        force: bool = False,
        quiet: bool = False,
        failures: list[str] | None = None,
    ) -> list[UpgradeJob]:
        """One operation per target (names or backends), by name; exit non-zero when any failed.

        In the foreground each job runs here, on this node, before the next is asked for; with
        `queue` the jobs go to the workers (a fan-out to the nodes that have it in distributed mode).
        What did not succeed is added to `failures` (the caller's, to report with its own); without
        `failures` the command ends with an error when the list is not empty.
        """
        backends = [target if isinstance(target, Backend) else self.lookup(target) for target in targets]
        own = failures is None
        failures = [] if failures is None else failures

        def run_here(job: UpgradeJob) -> UpgradeJob:
            if kind == JobKind.UPGRADE and not quiet and job.backend:
                available = job.backend.available_version
                self.stdout.write(
                    f"Upgrading {job.backend.name}{f' to v{available}' if available else ''}..."
                )
            job = self.follow(job, run=True, quiet=quiet)
            self.report(job, quiet=quiet)
            return job

        outcomes = (
            Backend.objects.filter(pk__in=[b.pk for b in backends])
            .order_by("name")
            .request_each(
                kind,
                node=None if queue else Node.local(),
                requested_by=self.requested_by,
                force=force,
                run=None if queue else run_here,
            )
        )
        jobs = list(outcomes.jobs)
        for backend, exc in outcomes.refused:
            self.stderr.write(f"{backend.name}: {exc}")
            failures.append(f"{backend.name}: {exc}")
        for backend, job in outcomes.already_active:
            if queue:
                self.stdout.write(f"{backend.name}: job {job.pk} is already {job.status}")
                continue
            self.stdout.write(f"{backend.name}: job {job.pk} is already {job.status}; following it")
            job = self.follow(job, run=False, quiet=quiet)
            self.report(job, quiet=quiet)
            jobs.append(job)
        if queue:
            for job in outcomes.jobs:
                self.stdout.write(
                    f"{job.backend.name if job.backend else '-'}: {kind} queued as job {job.pk}"
                )
        else:
            failures += [
                f"{job.backend.name if job.backend else '-'}: {job.status}"
                for job in jobs
                if job.status != JobStatus.SUCCEEDED
            ]
        if own and failures:
            raise CommandError(f"{len(failures)} of {len(backends)} operation(s) did not succeed")
        return jobs

    def report(self, job: UpgradeJob, *, quiet: bool) -> None:
        """LocalAI's line for the outcome ("Backend x upgraded successfully", "Failed to upgrade x:
        ..."), then ours with the job and how long it took."""
        name = job.backend.name if job.backend else "-"
        if job.status == JobStatus.SUCCEEDED:
            if not quiet:
                self.stdout.write(f"Backend {name} {DONE.get(job.kind, job.kind)} successfully")
                self.stdout.write(f"  {job.message} (job {job.pk}, {_seconds(job)})")
        else:
            outcome = f"job {job.pk} {job.get_status_display()}"
            self.stderr.write(f"Failed to {job.kind} {name}: {job.error or job.message} ({outcome})")

    def follow(self, job: UpgradeJob, *, run: bool, quiet: bool) -> UpgradeJob:
        """Run the job here (`run`), or watch it run in another process, showing its progress."""
        display = _Progress(self, job, tty=sys.stdout.isatty() and not quiet, quiet=quiet)
        try:
            if run:
                return jobs.run(job.pk, observer=display.update)
            while job.is_active:
                display.update(job)
                time.sleep(0.2)
                job.refresh_from_db()
            return job
        finally:
            display.close()

    def lookup(self, name: str) -> Backend:
        try:
            return Backend.objects.lookup(name)
        except (Backend.DoesNotExist, Backend.MultipleObjectsReturned) as exc:
            raise CommandError(str(exc)) from exc

    def handle_pin(self, names: list[str], **options: Any) -> None:
        for name in names:
            self.lookup(name).pin()
            self.stdout.write(f"{name}: pinned (never upgraded automatically)")

    def handle_unpin(self, names: list[str], **options: Any) -> None:
        for name in names:
            self.lookup(name).unpin()
            self.stdout.write(f"{name}: unpinned")

    # -- the disk ------------------------------------------------------------------------------

    def handle_scan(self, **options: Any) -> None:
        node = Node.local()
        problems = procedure.record_disk_state(node)
        count = InstalledVersion.objects.filter(node=node, state=InstalledVersion.State.CURRENT).count()
        self.stdout.write(f"{count} backend(s) recorded on {node.name} from {node.backends_path}")
        for problem in problems:
            self.stdout.write(f"  problem: {problem}")

    def handle_reconcile(self, **options: Any) -> None:
        report = procedure.reconcile()
        self.stdout.write(report.summary())

    def handle_check(self, json: bool = False, **options: Any) -> None:
        report = detection.find_upgrades(requested_by=self.requested_by)
        if json:
            self.stdout.write(_json(report.rows))
        else:
            self.stdout.write(report.summary())
        if any(row.get("error") for row in report.rows):
            raise CommandError("the check could not reach every backend's registry")

    def handle_publish(
        self,
        directory: str,
        reference: str,
        image_version: str | None,
        platform: list[str] | None,
        **options: Any,
    ) -> None:
        path = Path(directory)
        if not (path / "run.sh").is_file():
            raise CommandError(f"{path} has no run.sh: not a backend directory")
        try:
            client = registry.client_from_settings()
            with client:
                digest = oci.publish(
                    path, reference, version=image_version, platforms=platform, client=client
                )
        except oci.OCIError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"published {path} as {reference} ({digest})")


class _Progress:
    """A tqdm bar with bytes and speed on a terminal; a plain line per change of phase or 10% otherwise."""

    def __init__(self, command: Command, job: UpgradeJob, *, tty: bool, quiet: bool) -> None:
        self.command, self.tty, self.quiet = command, tty, quiet
        self.bar: tqdm | None = None
        self.last_line = ""
        self.name = job.backend.name if job.backend else "check"

    def update(self, job: UpgradeJob) -> None:
        if self.quiet:
            return
        if self.tty:
            if self.bar is None and job.bytes_total:
                self.bar = tqdm(
                    total=job.bytes_total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=self.name,
                    leave=True,
                )
            if self.bar is not None:
                self.bar.update(job.bytes_done - self.bar.n)
                self.bar.set_postfix_str(job.phase, refresh=False)
            return
        line = f"{self.name}: {job.phase}"
        if job.bytes_total:
            line += f" {int(job.percent) // 10 * 10}% of {job.bytes_total / 1048576:.1f} MiB"
        if line != self.last_line:
            self.command.stdout.write(line)
            self.last_line = line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _seconds(job: UpgradeJob) -> str:
    return f"{job.duration.total_seconds():.1f} s" if job.duration else "-"


def _skipped_json(backend: Backend) -> dict[str, Any]:
    """A named backend `upgrade` left alone, in `_job_json`'s keys."""
    return {
        **dict.fromkeys(("job", "kind", "from_version", "from_digest", "to_version", "to_digest", "error")),
        "name": backend.name,
        "status": "skipped",
        "message": "no upgrade available",
        "duration_seconds": None,
    }


def _job_json(job: UpgradeJob) -> dict[str, Any]:
    return {
        "job": job.pk,
        "name": job.backend.name if job.backend else None,
        "kind": job.kind,
        "status": job.status,
        "from_version": job.from_version,
        "from_digest": job.from_digest,
        "to_version": job.to_version,
        "to_digest": job.to_digest,
        "message": job.message,
        "error": job.error,
        "duration_seconds": job.duration.total_seconds() if job.duration else None,
    }


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
