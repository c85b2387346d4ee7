from __future__ import annotations

from django.apps import AppConfig


class BackendsAppConfig(AppConfig):
    name = "backends_app"
    verbose_name = "Backends"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from backends_app import checks, signals

        del checks  # imported for its @register side effect

        post_migrate.connect(signals.seed_defaults, sender=self)
        signals.connect_scheduling(self)
