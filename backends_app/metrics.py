"""Prometheus metrics: what the portal counts as it works, what it reads from the database when
scraped, and the `/metrics` endpoint. Every metric is described in docs/monitoring.md.

Two kinds of metrics, kept apart on purpose:

* **Events** (counters and histograms): jobs ended, checks, registry requests, gallery syncs. They
  are counted in the process where they happen (a web replica, a worker, a command) into that
  host's multi-process directory (``PROMETHEUS_MULTIPROC_DIR``, set by the settings before
  prometheus_client is imported), and added up across processes at scrape time
  (:mod:`backends_app.metrics_store`). Every one has labels, so a process creates files only once
  it has counted something: commands that count nothing leave nothing behind.
* **State** (gauges): backends installed per node, upgrades available, pinned, held, drift, node
  heartbeats, active jobs, the last successful check, gallery sync errors. They are computed from
  the database at each scrape by :class:`PortalStateCollector`, in a fixed number of queries, so
  they are right on any replica and never stale; no process keeps them.

The models know nothing of this module: job ends and gallery syncs arrive through the models'
signals (connected in `BackendsAppConfig.ready`), registry requests through the observer
`registry.client_from_settings` gives the oci client.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import logging
import os
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core import checks
from django.db import DatabaseError
from django.db.models import Count, Max, Min
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_http_methods
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from backends_app.metrics_store import MetricFiles
from backends_app.models import (
    HEARTBEAT_TIMEOUT,
    Backend,
    BackendState,
    Gallery,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    PortalSettings,
    SyncResult,
    UpgradeJob,
)

log = logging.getLogger(__name__)

# --- events: counted where they happen --------------------------------------------------------
# registry=None: never in prometheus_client's global registry; /metrics builds its own per scrape.

JOBS = Counter(
    "portal_jobs",
    "Jobs that ended, by kind and outcome (the job's final status).",
    ["kind", "outcome"],
    registry=None,
)
JOB_SECONDS = Histogram(
    "portal_job_duration_seconds",
    "How long jobs ran, from start to end, by kind.",
    ["kind"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf")),
    registry=None,
)
CHECK_SECONDS = Histogram(
    "portal_check_duration_seconds",
    "How long upgrade checks took (gallery sync and registry look-ups), by outcome.",
    ["outcome"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf")),
    registry=None,
)
REGISTRY_REQUESTS = Counter(
    "portal_registry_requests",
    'HTTP requests to OCI registries by registry, method and status ("error": no answer).',
    ["registry", "method", "status"],
    registry=None,
)
GALLERY_SYNCS = Counter(
    "portal_gallery_syncs",
    "Gallery syncs by gallery and outcome (synced, not_modified, failed).",
    ["gallery", "outcome"],
    registry=None,
)


def record_job_end(sender: Any, job: UpgradeJob, fields: tuple[str, ...], **kwargs: Any) -> None:
    """`job_changed` receiver: a job reached its end; count it and its duration.

    A fan-out parent (no node, not a check) is not counted: its children, one per node, are.
    Never raises: a metric must not disturb the job's own bookkeeping.
    """
    try:
        if "status" not in fields or job.status not in JobStatus.FINISHED:
            return
        if job.node_id is None and job.kind != JobKind.CHECK:
            return
        JOBS.labels(job.kind, job.status).inc()
        if job.started_at and job.finished_at:
            seconds = (job.finished_at - job.started_at).total_seconds()
            JOB_SECONDS.labels(job.kind).observe(max(0.0, seconds))
    except Exception:
        log.exception("counting the end of job %s", job.pk)


def record_gallery_sync(sender: Any, gallery: Gallery, result: SyncResult, **kwargs: Any) -> None:
    """`gallery_synced` receiver."""
    try:
        outcome = "failed" if result.error else "not_modified" if result.not_modified else "synced"
        GALLERY_SYNCS.labels(gallery.name, outcome).inc()
    except Exception:
        log.exception("counting the sync of gallery %s", gallery.name)


def record_check(outcome: str, seconds: float) -> None:
    """A check's look-up ended: `outcome` is succeeded, partial, failed or cancelled."""
    try:
        CHECK_SECONDS.labels(outcome).observe(max(0.0, seconds))
    except Exception:
        log.exception("counting a check")


def record_registry_response(registry: str, method: str, status: int | None) -> None:
    """The oci client's `on_response` observer: one HTTP exchange (None: no answer at all)."""
    REGISTRY_REQUESTS.labels(registry, method, str(status) if status else "error").inc()


# --- state: read from the database at scrape time ----------------------------------------------

#: The states an installed backend can be in (Backend.status), each reported per node.
INSTALLED_STATES = tuple(state for state in BackendState.values if state != BackendState.NOT_INSTALLED)


def _timestamp(moment: dt.datetime | None) -> float:
    return moment.timestamp() if moment else 0.0


class PortalStateCollector:
    """Gauges computed from the database at each scrape, in a fixed number of queries (ten,
    however many backends, nodes and jobs there are). A database that cannot be reached gives
    ``portal_database_up 0`` and no state gauges, while the event counters are still served."""

    def collect(self) -> Iterator[Metric]:
        try:
            families, answered = list(self._families()), True
        except DatabaseError as exc:
            log.warning("metrics: the database could not be read: %s", exc)
            families, answered = [], False
        yield GaugeMetricFamily(
            "portal_database_up",
            "1 when the database answered this scrape's queries.",
            value=1.0 if answered else 0.0,
        )
        yield from families

    def _families(self) -> Iterator[Metric]:
        now = timezone.now()
        current = InstalledVersion.State.CURRENT
        nodes = list(Node.objects.order_by("name"))
        names = {node.pk: node.name for node in nodes}

        online = GaugeMetricFamily(
            "portal_node_online",
            f"1 while the node's worker heartbeats (within {HEARTBEAT_TIMEOUT.seconds} s).",
            labels=["node"],
        )
        age = GaugeMetricFamily(
            "portal_node_heartbeat_age_seconds",
            "Seconds since the node's worker last heartbeated (nodes that never did are left out).",
            labels=["node"],
        )
        for node in nodes:
            online.add_metric([node.name], 1.0 if node.online else 0.0)
            if node.last_heartbeat_at:
                age.add_metric([node.name], max(0.0, (now - node.last_heartbeat_at).total_seconds()))
        yield online
        yield age

        installed_counts = dict(
            InstalledVersion.objects.filter(state=current)
            .order_by()
            .values_list("node_id")
            .annotate(n=Count("id"))
        )
        upgradable_counts = dict(
            InstalledVersion.objects.filter(state=current, backend__in=Backend.objects.upgradable())
            .order_by()
            .values_list("node_id")
            .annotate(n=Count("id"))
        )
        states: Tally[tuple[int, str]] = Tally()
        pinned: Tally[int] = Tally()
        held: Tally[int] = Tally()
        drift = GaugeMetricFamily(
            "portal_backend_drift",
            "For each backend installed on several nodes: 1 when they do not all run the same build.",
            labels=["gallery", "backend"],
        )
        drifted = 0
        for backend in Backend.objects.installed_on().with_installations():
            rows = backend.current_versions()
            state = backend.status.state
            for row in rows:
                states[(row.node_id, state)] += 1
                pinned[row.node_id] += backend.pinned
                held[row.node_id] += bool(backend.held_version or backend.held_digest)
            if len({row.node_id for row in rows}) > 1:
                drift.add_metric([backend.gallery.name, backend.name], 1.0 if backend.drift else 0.0)
                drifted += backend.drift

        per_node = (
            (
                "portal_backends_installed",
                "Backends installed (current versions) on the node.",
                installed_counts,
            ),
            (
                "portal_upgrades_available",
                "Installed backends the last check flagged and that are not pinned: what "
                "'upgrade all' takes on the node.",
                upgradable_counts,
            ),
            ("portal_backends_pinned", "Installed backends that are pinned, on the node.", pinned),
            ("portal_backends_held", "Installed backends holding back a bad version, on the node.", held),
        )
        for name, documentation, counts in per_node:
            family = GaugeMetricFamily(name, documentation, labels=["node"])
            for node_id, node_name in names.items():
                family.add_metric([node_name], float(counts.get(node_id, 0)))
            yield family
        by_state = GaugeMetricFamily(
            "portal_backends_by_state",
            "Installed backends on the node by state, as the pages and the API show it.",
            labels=["node", "state"],
        )
        for node_id, node_name in names.items():
            for state in INSTALLED_STATES:
                by_state.add_metric([node_name, state], float(states[(node_id, state)]))
        yield by_state
        yield drift
        yield GaugeMetricFamily(
            "portal_backends_drifted",
            "Backends whose nodes do not all run the same build.",
            value=float(drifted),
        )

        active = GaugeMetricFamily(
            "portal_jobs_active", "Jobs queued or running, by kind and status.", labels=["kind", "status"]
        )
        found = {
            (kind, status): (n, oldest)
            for kind, status, n, oldest in UpgradeJob.objects.filter(status__in=JobStatus.ACTIVE)
            .order_by()
            .values_list("kind", "status")
            .annotate(n=Count("id"), oldest=Min("created_at"))
        }
        for kind in JobKind.values:
            for status in JobStatus.ACTIVE:
                active.add_metric([kind, status], float(found.get((kind, status), (0, None))[0]))
        yield active
        queued_since = [oldest for (_, status), (_, oldest) in found.items() if status == JobStatus.QUEUED]
        yield GaugeMetricFamily(
            "portal_job_oldest_queued_age_seconds",
            "Seconds the oldest queued job has waited for a worker (0: none queued).",
            value=max(0.0, (now - min(queued_since)).total_seconds()) if queued_since else 0.0,
        )

        last_check = UpgradeJob.objects.filter(
            kind=JobKind.CHECK, status__in=(JobStatus.SUCCEEDED, JobStatus.PARTIAL)
        ).aggregate(last=Max("finished_at"))["last"]
        yield GaugeMetricFamily(
            "portal_last_successful_check_timestamp_seconds",
            "Unix time the last upgrade check ended that reached the registries (succeeded or "
            "partly failed); 0: never.",
            value=_timestamp(last_check),
        )
        yield GaugeMetricFamily(
            "portal_check_interval_seconds",
            "The periodic check's interval, from the settings.",
            value=PortalSettings.load().check_interval.total_seconds(),
        )

        sync_error = GaugeMetricFamily(
            "portal_gallery_sync_error",
            "1 when the gallery's last sync failed (its error is on the gallery's admin page).",
            labels=["gallery"],
        )
        synced_at = GaugeMetricFamily(
            "portal_gallery_last_sync_timestamp_seconds",
            "Unix time of the gallery's last successful sync; 0: never.",
            labels=["gallery"],
        )
        for name, error, last_synced in Gallery.objects.filter(enabled=True).values_list(
            "name", "last_error", "last_synced_at"
        ):
            sync_error.add_metric([name], 1.0 if error else 0.0)
            synced_at.add_metric([name], _timestamp(last_synced))
        yield sync_error
        yield synced_at


# --- the endpoint ------------------------------------------------------------------------------


def metric_files() -> MetricFiles:
    """This host's multi-process metric files (the directory the settings chose)."""
    return MetricFiles(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.PORTAL_METRICS_DIR)


def exposition() -> bytes:
    """Everything /metrics serves, in Prometheus' text format: first the dead processes' files are
    folded in (a quick no-op when none died), then a fresh registry adds up the files and reads the
    database."""
    files = metric_files()
    files.compact()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(files)
    registry.register(PortalStateCollector())
    return generate_latest(registry)


def _is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address((address or "").split("%")[0]).is_loopback
    except ValueError:
        return False


def _bearer_token_matches(request: HttpRequest) -> bool:
    token = settings.PORTAL_METRICS_TOKEN
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not token or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _refusal(request: HttpRequest) -> HttpResponse | None:
    """Why this request may not see the metrics, as the response to send; None when it may."""
    if _bearer_token_matches(request):
        return None
    if settings.PORTAL_METRICS_LOOPBACK and _is_loopback(request.META.get("REMOTE_ADDR")):
        return None
    if not settings.PORTAL_METRICS_TOKEN:
        where = "loopback clients only" if settings.PORTAL_METRICS_LOOPBACK else "nobody"
        return HttpResponse(
            f"/metrics is served to {where}: set PORTAL_METRICS_TOKEN to allow scrapes with "
            "'Authorization: Bearer <token>'\n",
            status=403,
            content_type="text/plain; charset=utf-8",
        )
    response = HttpResponse(
        "/metrics needs 'Authorization: Bearer <PORTAL_METRICS_TOKEN>'\n",
        status=401,
        content_type="text/plain; charset=utf-8",
    )
    response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@require_http_methods(["GET", "HEAD"])
def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics: loopback clients (unless PORTAL_METRICS_LOOPBACK is off), or the bearer token."""
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)


def monitoring_facts(request: HttpRequest | None) -> dict[str, Any]:
    """What the settings page and the admin say about monitoring (never the token itself)."""
    from django.urls import reverse

    path = reverse("metrics")
    return {
        "metrics_url": request.build_absolute_uri(path) if request is not None else path,
        "metrics_path": path,
        "token_set": bool(settings.PORTAL_METRICS_TOKEN),
        "loopback_open": settings.PORTAL_METRICS_LOOPBACK,
        "metrics_dir": str(settings.PORTAL_METRICS_DIR),
    }


# --- start-up and system checks ----------------------------------------------------------------


def prepare_metric_files() -> str:
    """At `serve` or `worker` start: start the counts afresh when no process of this host is
    counting, else fold in the dead ones (see metrics_store). Returns what was done, for the log."""
    files = metric_files()
    if files.reset_if_idle():
        return f"metrics: {files.path} emptied (no live process was counting)"
    return f"metrics: {files.path} kept (live processes count into it); dead processes folded in"


@checks.register()
def metrics_check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    problems: list[checks.CheckMessage] = []
    if not getattr(prometheus_values.ValueClass, "_multiprocess", False):
        problems.append(
            checks.Error(
                "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set: this "
                "process's counters stay in memory and never reach /metrics",
                hint="Import prometheus_client only after Django's settings are loaded, or set "
                "PROMETHEUS_MULTIPROC_DIR in the service's environment.",
                id="portal.E030",
            )
        )
    directory = Path(settings.PORTAL_METRICS_DIR)
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        problems.append(
            checks.Error(
                f"PROMETHEUS_MULTIPROC_DIR={directory} is not a writable directory", id="portal.E031"
            )
        )
    if not settings.PORTAL_METRICS_LOOPBACK and not settings.PORTAL_METRICS_TOKEN:
        problems.append(
            checks.Warning(
                "PORTAL_METRICS_LOOPBACK is off and PORTAL_METRICS_TOKEN is unset: /metrics refuses "
                "every request",
                id="portal.W030",
            )
        )
    return problems
