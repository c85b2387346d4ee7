"""The registry client as the settings configure it: timeouts, retries, insecure hosts, credentials,
and the observer counting its requests for /metrics.

The one place that turns `PORTAL_REGISTRY_*` settings into an `oci.RegistryClient`; the procedure,
the upgrade check, the commands and the benchmarks all build their client here.
"""

from __future__ import annotations

import os

from django.conf import settings

from backends_app import metrics, oci


def client_from_settings(platform: str | None = None) -> oci.RegistryClient:
    """A registry client configured from the settings, for `platform` (default: this machine's)."""
    auth_file = settings.PORTAL_REGISTRY_AUTH_FILE
    return oci.RegistryClient(
        oci.RegistryConfig(
            insecure_hosts=tuple(settings.PORTAL_INSECURE_REGISTRIES),
            timeout=(min(10.0, settings.PORTAL_REGISTRY_TIMEOUT), float(settings.PORTAL_REGISTRY_TIMEOUT)),
            retries=settings.PORTAL_REGISTRY_RETRIES,
            speed_limit=settings.PORTAL_REGISTRY_SPEED_LIMIT,
            speed_time=float(settings.PORTAL_REGISTRY_SPEED_TIME),
            blob_deadline=float(settings.PORTAL_REGISTRY_BLOB_DEADLINE),
            auth_file=auth_file if auth_file and os.path.exists(auth_file) else None,
            platform=platform or settings.PORTAL_PLATFORM,
            on_response=metrics.record_registry_response,  # requests by status, 429s included
        )
    )
