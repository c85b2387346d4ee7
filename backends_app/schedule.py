"""The periodic upgrade check: its django-q2 schedule, the guard that lets exactly one check run per
interval however many replicas and workers tick, and the automatic upgrades that follow a check.

Exactly once per interval, two layers (docs/upgrades.md):

* A PostgreSQL session advisory lock (`ADVISORY_LOCK_KEY`), taken with ``pg_try_advisory_lock`` on
  a dedicated connection and held for the whole scheduled run, so two scheduled runs never overlap
  (a check that outlasts its interval makes the next tick skip, not pile up). A session lock rather
  than ``pg_try_advisory_xact_lock``: the check does minutes of network work, and holding one
  transaction open that long would hide the job row's progress from the admin and pin a snapshot.
  If the process dies, PostgreSQL ends the session and the lock with it. On SQLite (one replica by
  definition) there is no lock; the guard below still works.
* The once-per-interval guard: intervals are aligned to the epoch (UTC; every 360 minutes means
  00:00, 06:00, 12:00, 18:00 UTC), and a run claims the current interval with one conditional
  UPDATE of `PortalSettings.last_check_at` that succeeds for exactly one caller. The schedule ticks
  in the middle of each interval, so a scheduler waking late or early never lands in the wrong one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Iterator

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import Q
from django.utils import timezone
from django_q.models import Schedule

from backends_app import detection, jobs
from backends_app.models import (
    Backend,
    JobKind,
    Node,
    OperationRefused,
    PortalSettings,
    UpgradeJob,
)

log = logging.getLogger(__name__)

SCHEDULE_NAME = "backends-periodic-check"
CHECK_TASK = "backends_app.tasks.scheduled_check"
WINDOW_SCHEDULE_NAME = "backends-auto-upgrade-window"
WINDOW_TASK = "backends_app.tasks.window_auto_upgrade"

#: The advisory lock every scheduled run takes: the bytes ``b"bpcheck1"`` as a signed 64-bit
#: integer (0x6270636865636B31). Fixed, so every replica and version agrees on it.
ADVISORY_LOCK_KEY = 7093278713137294129

SCHEDULER = "scheduler"
AUTO_UPGRADE_BY = "scheduler:auto-upgrade"
WINDOW_BY = "scheduler:maintenance-window"

# django-q2 keeps a schedule's minutes in a PositiveSmallIntegerField.
MAX_SCHEDULE_MINUTES = 32767
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


# --- intervals ------------------------------------------------------------------------------------


def interval_start(moment: dt.datetime, interval: dt.timedelta) -> dt.datetime:
    """The start of the epoch-aligned interval holding `moment`."""
    elapsed = (moment - _EPOCH) // _MICROSECOND
    step = max(1, interval // _MICROSECOND)
    return _EPOCH + dt.timedelta(microseconds=elapsed - elapsed % step)


def claim_interval(interval: dt.timedelta, now: dt.datetime | None = None) -> bool:
    """Claim the current interval for a check: True for exactly one caller per interval.

    One conditional UPDATE: the database serialises concurrent updaters of the row, and a second
    one re-reads the condition after the first commits, finds `last_check_at` inside the interval,
    and updates nothing.
    """
    now = now or timezone.now()
    PortalSettings.load()  # the row exists
    claimed = (
        PortalSettings.objects.filter(pk=PortalSettings.SINGLETON_PK)
        .filter(Q(last_check_at__isnull=True) | Q(last_check_at__lt=interval_start(now, interval)))
        .update(last_check_at=now)
    )
    return claimed == 1


@contextlib.contextmanager
def advisory_lock(key: int = ADVISORY_LOCK_KEY) -> Iterator[bool]:
    """Try the session advisory lock on a dedicated connection; yields whether it was taken.

    Held until the block ends (the connection is closed, which releases it even if the unlock is
    never reached). Yields True without locking on databases other than PostgreSQL.
    """
    if connection.vendor != "postgresql":
        yield True
        return
    session = connections.create_connection(DEFAULT_DB_ALIAS)
    try:
        with session.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
            row = cursor.fetchone()
        locked = bool(row and row[0])
        yield locked
        if locked:
            with session.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [key])
    finally:
        session.close()


# --- the django-q2 schedule -----------------------------------------------------------------------


def schedule_minutes(interval_minutes: int) -> int:
    """The schedule's tick: the interval, or daily for intervals django-q2 cannot store (22+ days)."""
    return interval_minutes if interval_minutes <= MAX_SCHEDULE_MINUTES else 24 * 60


def next_tick(portal_settings: PortalSettings, now: dt.datetime | None = None) -> dt.datetime:
    """When the schedule should fire next: now if the current interval has had no check yet, else
    the middle of the next interval (ticking mid-interval keeps a late or early wake-up inside it)."""
    now = now or timezone.now()
    interval = portal_settings.check_interval
    start = interval_start(now, interval)
    last = portal_settings.last_check_at
    if last is None or last < start:
        return now
    return start + interval + interval / 2


def ensure_schedule(portal_settings: PortalSettings | None = None) -> Schedule:
    """Create or update the periodic check's schedule from the settings; safe to call any time.

    Called after migrate and whenever the settings are saved, never at import time.
    """
    portal_settings = portal_settings or PortalSettings.load()
    row, _ = Schedule.objects.update_or_create(
        name=SCHEDULE_NAME,
        defaults={
            "func": CHECK_TASK,
            "schedule_type": Schedule.MINUTES,
            "minutes": schedule_minutes(portal_settings.check_interval_minutes),
            "repeats": -1,
            "next_run": next_tick(portal_settings),
        },
    )
    return row


def _rephase(portal_settings: PortalSettings, now: dt.datetime) -> None:
    """Move the schedule's next tick to the middle of the next interval (after a run)."""
    interval = portal_settings.check_interval
    middle = interval_start(now, interval) + interval + interval / 2
    Schedule.objects.filter(name=SCHEDULE_NAME).update(next_run=middle)


# --- the scheduled runs ---------------------------------------------------------------------------


@dataclasses.dataclass
class AutoUpgradeResult:
    """What the automatic upgrade after a check did."""

    enabled: bool = False
    queued: list[str] = dataclasses.field(default_factory=list)
    already_active: list[str] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)
    deferred_until: dt.datetime | None = None
    waiting: int = 0

    def summary(self) -> str:
        if not self.enabled:
            return "auto-upgrade off"
        if self.deferred_until is not None:
            when = timezone.localtime(self.deferred_until).strftime("%Y-%m-%d %H:%M %Z")
            return f"auto-upgrade: {self.waiting} wait for the maintenance window ({when})"
        parts = [f"{len(self.queued)} upgrade(s) queued"]
        if self.already_active:
            parts.append(f"{len(self.already_active)} already queued or running")
        if self.refused:
            parts.append(f"{len(self.refused)} refused ({'; '.join(self.refused)})")
        return "auto-upgrade: " + ", ".join(parts)


def auto_upgrade(
    report: detection.CheckReport, portal_settings: PortalSettings, now: dt.datetime | None = None
) -> AutoUpgradeResult:
    """Queue an upgrade for each backend and node the check flagged (never pinned or held, never
    one with an error), when auto-upgrade is on and inside the maintenance window. An operation
    already queued or running is not duplicated (`Backend.request_on_node` returns it)."""
    result = AutoUpgradeResult(enabled=portal_settings.auto_upgrade_enabled)
    if not result.enabled:
        return result
    candidates = [r for r in report.upgrades if not r.error]
    if not candidates:
        return result
    now = now or timezone.now()
    if not portal_settings.in_maintenance_window(now):
        result.waiting = len(candidates)
        result.deferred_until = defer_to_window(portal_settings, now)
        return result
    backends = Backend.objects.in_bulk({r.backend_id for r in candidates})
    nodes = Node.objects.in_bulk({r.node_id for r in candidates})
    flagged: dict[int, list[Node]] = {}
    for candidate in candidates:
        if candidate.backend_id in backends and candidate.node_id in nodes:
            flagged.setdefault(candidate.backend_id, []).append(nodes[candidate.node_id])
    distributed = Node.objects.exclude(queue="").exists()
    for backend_id, on_nodes in flagged.items():
        backend = backends[backend_id]
        label = f"{backend.name} on {', '.join(n.name for n in on_nodes)}"
        try:
            if distributed:  # one parent job fanning out to the flagged nodes, as an operator's would
                job, created = backend.fan_out(JobKind.UPGRADE, nodes=on_nodes, requested_by=AUTO_UPGRADE_BY)
            else:
                job, created = backend.request_on_node(
                    on_nodes[0], JobKind.UPGRADE, requested_by=AUTO_UPGRADE_BY
                )
        except OperationRefused as exc:  # pinned, uninstalled or busy since the check
            result.refused.append(f"{label}: {exc}")
            continue
        (result.queued if created else result.already_active).append(f"{label} (job {job.pk})")
    return result


def next_window_start(portal_settings: PortalSettings, now: dt.datetime) -> dt.datetime | None:
    """The next time the maintenance window opens (server time), or None without a window."""
    start = portal_settings.maintenance_window_start
    if start is None or portal_settings.maintenance_window_end is None:
        return None
    local = timezone.localtime(now)
    candidate = timezone.make_aware(dt.datetime.combine(local.date(), start))
    if candidate <= now:
        candidate = timezone.make_aware(dt.datetime.combine(local.date() + dt.timedelta(days=1), start))
    return candidate


def defer_to_window(portal_settings: PortalSettings, now: dt.datetime) -> dt.datetime | None:
    """Schedule one run at the next window opening (one schedule, however often this is called)."""
    when = next_window_start(portal_settings, now)
    if when is None:
        return None
    Schedule.objects.update_or_create(
        name=WINDOW_SCHEDULE_NAME,
        defaults={"func": WINDOW_TASK, "schedule_type": Schedule.ONCE, "repeats": -1, "next_run": when},
    )
    return when


def _check_then_upgrade(requested_by: str, portal_settings: PortalSettings) -> str:
    """One CHECK job (visible in the admin), then the automatic upgrades; the job says both.

    When a check asked by hand is active (the database allows one active check job), this one still
    runs, without a job row of its own, so the interval's automatic upgrades are not lost.
    """

    def upgrade(report: detection.CheckReport) -> str:
        try:
            return auto_upgrade(report, portal_settings).summary()
        except Exception as exc:
            log.exception("auto-upgrade after the scheduled check failed")
            return f"auto-upgrade failed: {exc}"

    job, created = UpgradeJob.request_check(requested_by, queue=False)
    if not created:
        outcome = jobs.run_check(None, requested_by=requested_by, after=upgrade)
        return f"scheduled check (job {job.pk} was already active): {outcome}"
    job = jobs.run(job.pk, after_check=upgrade)
    return f"check job {job.pk}: {job.error or job.message}"


def run_scheduled_check(interval: dt.timedelta | None = None) -> str:
    """The periodic task: lock, claim this interval, check, auto-upgrade. Returns what it did.

    `interval` overrides the settings' interval (tests use seconds); the schedule is then left as it
    is. Any number of concurrent callers run one check per interval between them.
    """
    with advisory_lock() as locked:
        if not locked:
            return "skipped: another process is running the scheduled check"
        portal_settings = PortalSettings.load()
        now = timezone.now()
        try:
            if not claim_interval(interval or portal_settings.check_interval, now):
                return "skipped: this interval has been checked already"
            return _check_then_upgrade(SCHEDULER, portal_settings)
        finally:
            if interval is None:
                _rephase(portal_settings, now)


def run_window_upgrade() -> str:
    """At the maintenance window's opening: a fresh check, then the automatic upgrades."""
    with advisory_lock() as locked:
        if not locked:
            return "skipped: another process is running the scheduled check"
        portal_settings = PortalSettings.load()
        if not portal_settings.auto_upgrade_enabled:
            return "skipped: auto-upgrade is off"
        if not portal_settings.in_maintenance_window():
            return "skipped: outside the maintenance window"
        return _check_then_upgrade(WINDOW_BY, portal_settings)
