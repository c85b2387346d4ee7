from __future__ import annotations

from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class PortalAdminConfig(admin_apps.AdminConfig):
    """Django's admin with the portal's own site (its header, favicon and dashboard): every model
    registered with `admin.register`, ours and the libraries', lands on it. Named in INSTALLED_APPS
    in place of django.contrib.admin."""

    default = False  # this module's default configuration is BackendsAppConfig
    default_site = "backends_app.admin_site.PortalAdminSite"


class BackendsAppConfig(AppConfig):
    name = "backends_app"
    verbose_name = "Backends"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from backends_app import live, metrics, models, notifications, signals, system_checks

        del system_checks  # imported for its @register side effect (metrics registers its own)

        post_migrate.connect(signals.seed_defaults, sender=self)
        models.job_changed.connect(live.job_changed, dispatch_uid="backends-live-job-pages")
        models.job_changed.connect(notifications.job_changed, dispatch_uid="backends-notifications")
        models.job_changed.connect(metrics.record_job_end, dispatch_uid="backends-metrics-jobs")
        models.gallery_synced.connect(metrics.record_gallery_sync, dispatch_uid="backends-metrics-galleries")
        signals.connect_scheduling(self)
