"""The registry client as the settings configure it: timeouts, retries, insecure hosts, credentials,
and the observer counting its requests for /metrics.

The one place that turns `PORTAL_REGISTRY_*` settings into an `oci.RegistryClient`; the procedure,
the upgrade check, the commands and the benchmarks all build their client here. The Sigstore trust
root signatures are verified against comes from here too (`PORTAL_SIGSTORE_TRUSTED_ROOT`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from django.conf import settings

from backends_app import metrics, oci
from backends_app.oci import signatures

if TYPE_CHECKING:
    from sigstore.models import TrustedRoot


def client_from_settings(platform: str | None = None) -> oci.RegistryClient:
    """A registry client configured from the settings, for `platform` (default: this machine's)."""
    auth_file = settings.PORTAL_REGISTRY_AUTH_FILE
    return oci.RegistryClient(
        oci.RegistryConfig(
            insecure_hosts=tuple(settings.PORTAL_INSECURE_REGISTRIES),
            timeout=(min(10.0, settings.PORTAL_REGISTRY_TIMEOUT), float(settings.PORTAL_REGISTRY_TIMEOUT)),
            retries=settings.PORTAL_REGISTRY_RETRIES,
            max_in_flight=max(1, settings.PORTAL_REGISTRY_CONCURRENCY),
            rate_limit_patience=float(settings.PORTAL_REGISTRY_RATE_LIMIT_PATIENCE),
            speed_limit=settings.PORTAL_REGISTRY_SPEED_LIMIT,
            speed_time=float(settings.PORTAL_REGISTRY_SPEED_TIME),
            blob_deadline=float(settings.PORTAL_REGISTRY_BLOB_DEADLINE),
            pull_connections=settings.PORTAL_PULL_CONNECTIONS,
            pull_layers=settings.PORTAL_PULL_LAYERS,
            pull_part_size=settings.PORTAL_PULL_PART_MIB * 1024 * 1024,
            auth_file=auth_file if auth_file and os.path.exists(auth_file) else None,
            platform=platform or settings.PORTAL_PLATFORM,
            on_response=metrics.record_registry_response,  # requests by status, 429s included
        )
    )


def trusted_root_from_settings() -> TrustedRoot:
    """The Sigstore trust root PORTAL_SIGSTORE_TRUSTED_ROOT names, or the public-good one offline.

    Raises `oci.signatures.SignatureRejected` (reason ``trust_root``) when it cannot be read.
    """
    return signatures.load_trusted_root(settings.PORTAL_SIGSTORE_TRUSTED_ROOT or None)


def trust_root_source() -> str:
    """Where signatures are verified against, in one line (settings page, admin)."""
    return signatures.describe_trust_root(settings.PORTAL_SIGSTORE_TRUSTED_ROOT or None)
