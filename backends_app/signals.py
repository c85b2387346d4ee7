"""Defaults made after each migrate: the configured galleries and the settings row."""

from __future__ import annotations

from typing import Any

from backends_app.system_checks import configured_gallery_items


def seed_defaults(**kwargs: Any) -> None:
    """Create the galleries named in PORTAL_GALLERIES that do not exist yet; never overwrite edits.

    A `verification` block given there is stored with a new gallery, and on an existing one that
    has none yet; a block set in the admin or the API is never replaced.
    """
    from backends_app.models import Gallery, NotificationTarget, PortalSettings

    try:
        galleries = configured_gallery_items()
    except ValueError:
        galleries = []  # reported by the system check
    for item in galleries:
        gallery, _ = Gallery.objects.get_or_create(name=item.name, defaults={"url": item.url})
        if item.verification is not None and gallery.verification is None:
            gallery.set_verification(item.verification, item.signature_mode)
            gallery.save()
    PortalSettings.load()
    NotificationTarget.seed_from_settings()


def _schedule_table_ready() -> bool:
    """django-q2's tables exist (a partial migrate may run before django_q's migrations)."""
    from django.db import connection
    from django_q.models import Schedule

    return Schedule._meta.db_table in connection.introspection.table_names()


def update_check_schedule(sender: Any, instance: Any, raw: bool = False, **kwargs: Any) -> None:
    """PortalSettings saved: the periodic check's schedule follows its interval."""
    from backends_app import schedule

    if not raw and _schedule_table_ready():
        schedule.ensure_schedule(instance)


def ensure_check_schedule(**kwargs: Any) -> None:
    """After migrate: the periodic check's schedule exists (created once, then kept up to date)."""
    from backends_app import schedule

    if _schedule_table_ready():
        schedule.ensure_schedule()


def ensure_notification_schedule(**kwargs: Any) -> None:
    """After migrate: the notification task's schedule exists."""
    from backends_app import notifications

    if _schedule_table_ready():
        notifications.ensure_schedule()


def connect_scheduling(app_config: Any) -> None:
    """Wire the schedule's handlers (from AppConfig.ready; never schedules anything at import)."""
    from django.db.models.signals import post_migrate, post_save

    from backends_app.models import PortalSettings

    post_save.connect(update_check_schedule, sender=PortalSettings, dispatch_uid="backends-check-schedule")
    post_migrate.connect(ensure_check_schedule, sender=app_config, dispatch_uid="backends-check-schedule")
    post_migrate.connect(
        ensure_notification_schedule, sender=app_config, dispatch_uid="backends-notification-schedule"
    )
