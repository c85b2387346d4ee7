"""The periodic check: its schedule, one check per interval across processes, auto-upgrade."""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings as django_settings
from django.utils import timezone
from django_q.conf import Conf
from django_q.models import OrmQ, Schedule

from backends_app import schedule, tasks
from backends_app.models import Backend, InstalledVersion, JobKind, JobStatus, PortalSettings, UpgradeJob
from tests.registry import RegistryServer
from tests.test_detection import GalleryIndex, installed_backend, push
from tests.test_detection import index as index  # the fixture, shared

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 60.0


def check_jobs() -> list[UpgradeJob]:
    return list(UpgradeJob.objects.filter(kind=JobKind.CHECK).order_by("created_at"))


# --- the schedule ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_schedule_is_created_once_and_follows_the_interval_setting() -> None:
    schedule.ensure_schedule()
    schedule.ensure_schedule()

    rows = Schedule.objects.filter(name="backends-periodic-check")
    assert rows.count() == 1
    row = rows.get()
    assert (row.func, row.schedule_type, row.minutes) == ("backends_app.tasks.scheduled_check", "I", 360)

    portal_settings = PortalSettings.load()
    portal_settings.check_interval_minutes = 60
    portal_settings.save()  # as the admin or the settings page does

    row.refresh_from_db()
    assert row.minutes == 60
    assert rows.count() == 1


@pytest.mark.django_db
def test_the_schedule_ticks_mid_interval_once_the_interval_is_checked() -> None:
    portal_settings = PortalSettings.load()
    interval = portal_settings.check_interval  # 6 hours
    now = dt.datetime(2025, 3, 1, 7, 30, tzinfo=dt.UTC)
    assert schedule.interval_start(now, interval) == dt.datetime(2025, 3, 1, 6, 0, tzinfo=dt.UTC)

    assert schedule.next_tick(portal_settings, now) == now  # nothing checked yet: at once
    portal_settings.last_check_at = dt.datetime(2025, 3, 1, 6, 0, 5, tzinfo=dt.UTC)
    assert schedule.next_tick(portal_settings, now) == dt.datetime(2025, 3, 1, 15, 0, tzinfo=dt.UTC)
    # django-q2 stores at most 32767 minutes: a month-long interval ticks daily, the guard decides.
    assert schedule.schedule_minutes(60 * 24 * 31) == 24 * 60


@pytest.mark.django_db
def test_an_interval_is_claimed_once() -> None:
    interval = dt.timedelta(minutes=360)
    now = dt.datetime(2025, 3, 1, 7, 30, tzinfo=dt.UTC)

    assert schedule.claim_interval(interval, now)
    assert not schedule.claim_interval(interval, now + dt.timedelta(hours=4))  # 11:30, same interval
    assert schedule.claim_interval(interval, now + dt.timedelta(hours=4, minutes=31))  # 12:01
    assert PortalSettings.load().last_check_at == now + dt.timedelta(hours=4, minutes=31)


# --- one check per interval across processes ------------------------------------------------------

SCHEDULER_LOOP = """
import json, os, sys, time
import django
django.setup()
from backends_app import tasks
print("ready", flush=True)
start, end, interval = (float(x) for x in sys.stdin.readline().split())
while time.time() < start:
    time.sleep(0.005)
outcomes = []
while time.time() < end:
    outcomes.append(tasks.scheduled_check(interval_seconds=interval))
    time.sleep(0.02)
print(json.dumps(outcomes), flush=True)
"""


def _scheduler_env(tmp_path: Path) -> dict[str, str]:
    database = django_settings.DATABASES["default"]
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        DATABASE_URL=(
            f"postgres://{database['USER'] or 'root'}@{database['HOST'] or '127.0.0.1'}:"
            f"{database['PORT'] or 5432}/{database['NAME']}"  # the test database
        ),
        PORTAL_DATA_DIR=str(tmp_path / "data"),
        PORTAL_NODE_NAME="test-node",
        PORTAL_LOG_LEVEL="WARNING",
    )
    return env


def _read_line(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        assert process.stderr is not None
        raise AssertionError(f"scheduler process exited: {process.stderr.read()[-2000:]}")
    assert time.monotonic() < deadline, "scheduler process too slow"
    return line


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_three_scheduler_processes_run_exactly_one_check_per_interval(tmp_path: Path) -> None:
    interval = 3.0  # long enough that a loaded machine still ticks in every interval
    intervals = 3
    PortalSettings.load()
    deadline = time.monotonic() + DEADLINE
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SCHEDULER_LOOP],
            cwd=REPO,
            env=_scheduler_env(tmp_path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for process in processes:
            assert _read_line(process, deadline).strip() == "ready"
        # Start all three together at the next interval boundary; run for three whole intervals.
        start = (int(time.time() / interval) + 1) * interval
        end = start + intervals * interval - 0.1
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(f"{start} {end} {interval}\n")
            process.stdin.flush()
        outcomes = [json.loads(_read_line(process, deadline)) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)

    jobs = check_jobs()
    per_interval = collections.Counter(int(job.created_at.timestamp() // interval) for job in jobs)
    first = int(start // interval)
    # One check in each interval the processes ticked through, never two in one. (A call begun just
    # before `end` on a loaded machine may claim the interval after: at most one there too.)
    assert all(per_interval[first + i] == 1 for i in range(intervals)), per_interval
    assert max(per_interval.values()) == 1 and set(per_interval) <= {first + i for i in range(intervals + 1)}
    assert all(job.status == JobStatus.SUCCEEDED and job.requested_by == "scheduler" for job in jobs)
    ran = [o for process_outcomes in outcomes for o in process_outcomes if o.startswith("check job")]
    assert len(ran) == len(jobs)
    # Every process kept ticking and was turned away by the lock or the guard.
    for process_outcomes in outcomes:
        assert sum(o.startswith("skipped") for o in process_outcomes) >= intervals


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_is_skipped_while_another_process_holds_the_advisory_lock() -> None:
    database = django_settings.DATABASES["default"]
    with psycopg.connect(
        dbname=database["NAME"],
        user=database["USER"] or "root",
        host=database["HOST"] or "127.0.0.1",
        port=database["PORT"] or 5432,
        autocommit=True,
    ) as other:
        assert other.execute("SELECT pg_try_advisory_lock(%s)", [schedule.ADVISORY_LOCK_KEY]).fetchone() == (
            True,
        )
        outcome = tasks.scheduled_check()
        assert outcome == "skipped: another process is running the scheduled check"
        assert not check_jobs()
        assert PortalSettings.load().last_check_at is None

    assert tasks.scheduled_check().startswith("check job")  # released with the other session
    assert len(check_jobs()) == 1


# --- auto-upgrade ---------------------------------------------------------------------------------


@pytest.fixture
def sync_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run django-q2 tasks in-process (Q_CLUSTER is read once at import, so patch the Conf)."""
    monkeypatch.setattr(Conf, "SYNC", True)


def _auto_upgrade(on: bool = True, **fields: Any) -> PortalSettings:
    portal_settings = PortalSettings.load()
    portal_settings.auto_upgrade_backends = on
    for key, value in fields.items():
        setattr(portal_settings, key, value)
    portal_settings.save()
    return portal_settings


def _next_interval() -> None:
    PortalSettings.objects.update(last_check_at=timezone.now() - dt.timedelta(days=1))


@pytest.mark.django_db(transaction=True)
def test_auto_upgrade_upgrades_a_flagged_backend_but_not_a_pinned_one(
    registry: RegistryServer, index: GalleryIndex, sync_tasks: None
) -> None:
    flagged_ref, _ = installed_backend(registry, index, "flagged")
    pinned_ref, pinned_before = installed_backend(registry, index, "pinned")
    new_digest = push(registry, flagged_ref, "flagged build 2")
    push(registry, pinned_ref, "pinned build 2")
    Backend.objects.get(name="pinned").pin()
    _auto_upgrade()

    outcome = tasks.scheduled_check()

    assert "1 upgrade(s) queued" in outcome, outcome
    [upgrade] = UpgradeJob.objects.filter(kind=JobKind.UPGRADE)
    assert upgrade.backend.name == "flagged" and upgrade.requested_by == "scheduler:auto-upgrade"
    assert upgrade.status == JobStatus.SUCCEEDED, upgrade.error
    flagged_now = InstalledVersion.objects.get(name="flagged", state=InstalledVersion.State.CURRENT)
    assert flagged_now.digest == new_digest
    assert (Path(flagged_now.path) / "build.txt").read_text() == "flagged build 2"
    pinned_now = InstalledVersion.objects.get(name="pinned", state=InstalledVersion.State.CURRENT)
    assert pinned_now.digest == pinned_before.digest
    [check] = check_jobs()
    assert check.requested_by == "scheduler" and check.status == JobStatus.SUCCEEDED
    assert check.message == (
        "checked 2 backends: 1 upgrade available, 1 pinned, 0 errors; auto-upgrade: 1 upgrade(s) queued"
    )

    _next_interval()
    outcome = tasks.scheduled_check()  # the next tick: nothing left to do
    assert "0 upgrade(s) queued" in outcome, outcome
    assert UpgradeJob.objects.filter(kind=JobKind.UPGRADE).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_second_tick_does_not_queue_a_duplicate_upgrade(
    registry: RegistryServer, index: GalleryIndex
) -> None:
    ref, _ = installed_backend(registry, index, "slow")
    push(registry, ref, "slow build 2")
    _auto_upgrade()

    first = tasks.scheduled_check()  # no worker runs: the upgrade stays queued
    _next_interval()
    second = tasks.scheduled_check()

    assert "1 upgrade(s) queued" in first, first
    assert "0 upgrade(s) queued, 1 already queued or running" in second, second
    [upgrade] = UpgradeJob.objects.filter(kind=JobKind.UPGRADE)
    assert upgrade.status == JobStatus.QUEUED
    assert OrmQ.objects.count() == 1  # handed to the workers once
    assert len(check_jobs()) == 2


@pytest.mark.django_db(transaction=True)
def test_auto_upgrade_waits_for_the_maintenance_window(
    registry: RegistryServer, index: GalleryIndex, sync_tasks: None
) -> None:
    ref, installed = installed_backend(registry, index, "later")
    push(registry, ref, "later build 2")
    now = timezone.localtime()
    opens = (now + dt.timedelta(hours=2)).time().replace(second=0, microsecond=0)
    closes = (now + dt.timedelta(hours=3)).time().replace(second=0, microsecond=0)
    _auto_upgrade(maintenance_window_start=opens, maintenance_window_end=closes)

    outcome = tasks.scheduled_check()

    assert "auto-upgrade: 1 wait for the maintenance window" in outcome, outcome
    assert not UpgradeJob.objects.filter(kind=JobKind.UPGRADE).exists()
    window = Schedule.objects.get(name="backends-auto-upgrade-window")
    assert window.func == "backends_app.tasks.window_auto_upgrade" and window.schedule_type == "O"
    assert timezone.localtime(window.next_run).time() == opens
    assert dt.timedelta(hours=1) < window.next_run - now <= dt.timedelta(hours=2)

    # When the window opens, the run it scheduled checks again and upgrades.
    _auto_upgrade(maintenance_window_start=None, maintenance_window_end=None)
    outcome = tasks.window_auto_upgrade()
    assert "1 upgrade(s) queued" in outcome, outcome
    upgrade = UpgradeJob.objects.get(kind=JobKind.UPGRADE)
    assert upgrade.status == JobStatus.SUCCEEDED, upgrade.error
    assert check_jobs()[-1].requested_by == "scheduler:maintenance-window"
    installed.refresh_from_db()
    assert (Path(installed.path) / "build.txt").read_text() == "later build 2"


@pytest.mark.django_db(transaction=True)
def test_without_auto_upgrade_the_check_only_reports(registry: RegistryServer, index: GalleryIndex) -> None:
    ref, _ = installed_backend(registry, index, "manual")
    push(registry, ref, "manual build 2")
    _auto_upgrade(on=False)

    outcome = tasks.scheduled_check()

    assert outcome.endswith("checked 1 backend: 1 upgrade available, 0 errors; auto-upgrade off"), outcome
    assert Backend.objects.get(name="manual").upgrade_available
    assert not UpgradeJob.objects.filter(kind=JobKind.UPGRADE).exists()


@pytest.mark.django_db
def test_auto_upgrade_locked_on_by_the_environment_upgrades_whatever_is_stored(
    registry: RegistryServer, index: GalleryIndex, settings: Any
) -> None:
    ref, _ = installed_backend(registry, index, "locked")
    push(registry, ref, "locked build 2")
    _auto_upgrade(on=False)
    settings.PORTAL_SETTINGS_FROM_ENVIRONMENT = {
        "auto_upgrade_backends": ("LOCALAI_AUTO_UPGRADE_BACKENDS", "true", True)
    }

    outcome = tasks.scheduled_check()

    assert "1 upgrade(s) queued" in outcome, outcome
    assert PortalSettings.load().auto_upgrade_backends is False  # the stored value is kept
