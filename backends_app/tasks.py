"""django-q2 tasks: thin adapters that pass ids and call the models and the procedure."""

from __future__ import annotations

from backends_app import jobs
from backends_app.models import Gallery


def run_job(job_id: int) -> str:
    """Run one queued UpgradeJob (install, upgrade, rollback, uninstall or check)."""
    job = jobs.run(job_id)
    return f"job {job.pk} {job.status}: {job.error or job.message}"


def sync_galleries(names: list[str] | None = None) -> list[str]:
    """Sync the named galleries (default every enabled one); returns one summary line each."""
    galleries = Gallery.objects.filter(name__in=names) if names else Gallery.objects.filter(enabled=True)
    return [gallery.sync().summary() for gallery in galleries]


def scheduled_check(interval_seconds: float | None = None) -> str:
    """The periodic upgrade check (schedule "backends-periodic-check"): one per interval across
    replicas, then the automatic upgrades. `interval_seconds` overrides the interval (tests)."""
    import datetime as dt

    from backends_app import schedule

    interval = dt.timedelta(seconds=interval_seconds) if interval_seconds else None
    return schedule.run_scheduled_check(interval)


def window_auto_upgrade() -> str:
    """At the maintenance window's opening: check again and queue the automatic upgrades."""
    from backends_app import schedule

    return schedule.run_window_upgrade()


def notifications_tick() -> str:
    """Every minute (schedule "portal-notifications"): record what the state shows, send what is due."""
    from backends_app import notifications

    return notifications.tick()
