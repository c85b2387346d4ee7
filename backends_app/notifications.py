"""Notifications: which events are recorded and when, and how they are delivered (docs/notifications.md).

Recording is cheap and happens where things are seen: a finished job (the models' `job_changed`
signal: an upgrade or rollback that failed or rolled back, a check that failed N times in a row) and
`watch()`, which reads the portal's state (upgrades available, nodes offline, drift, galleries that
cannot be synced) after each check and every minute. Each event has a key stored with a unique
constraint, so the same thing is recorded once, whoever sees it and however often.

Delivery never runs inside a job or a request: the notification task (`tick`, a django-q2 schedule
every minute) groups the events waiting longer than the digest window into one message, sends it to
every enabled URL through `notify` (Apprise), and records each URL's outcome; failures are retried with
backoff, a bounded number of times. A job only ever writes an event row, and a problem recording one
is logged, never raised into the job.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from backends_app import notify
from backends_app.models import (
    HEARTBEAT_TIMEOUT,
    Backend,
    Gallery,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    NotificationDelivery,
    NotificationEvent,
    NotificationMessage,
    NotificationTarget,
    UpgradeJob,
)

log = logging.getLogger(__name__)

SCHEDULE_NAME = "portal-notifications"
TICK_TASK = "backends_app.tasks.notifications_tick"
# Messages sent per run at most (each bounded by PORTAL_NOTIFY_TIMEOUT); the rest wait for the next run.
MESSAGES_PER_RUN = 20

OPERATION_FAILURES = (JobStatus.FAILED, JobStatus.ROLLED_BACK, JobStatus.INTERRUPTED)
CHECK_FAILURES = (JobStatus.FAILED, JobStatus.PARTIAL, JobStatus.INTERRUPTED)
Kind = NotificationEvent.Kind


def absolute(path: str) -> str:
    """A link for a message: PORTAL_BASE_URL plus the page's path."""
    return settings.PORTAL_BASE_URL.rstrip("/") + path


def backend_link(backend: Backend) -> str:
    return absolute(reverse("admin:backends_app_backend_change", args=[backend.pk]))


def job_link(job: UpgradeJob) -> str:
    return absolute(reverse("ui:job", args=[job.pk]))


# --- recording ------------------------------------------------------------------------------------


def job_changed(sender: Any, job: UpgradeJob, fields: tuple[str, ...], **kwargs: Any) -> None:
    """The `job_changed` receiver: a job that just ended may be something to tell.

    Never raises: a notification problem must not touch the job (logged instead). Runs in a savepoint,
    so a database error here cannot spoil the caller's transaction either.
    """
    if "status" not in fields or job.status not in JobStatus.FINISHED:
        return
    try:
        with transaction.atomic():
            if job.kind == JobKind.CHECK:
                check_streak(job)
                watch()
            elif job.kind in (JobKind.UPGRADE, JobKind.ROLLBACK) and job.status in OPERATION_FAILURES:
                operation_failed(job)
    except Exception:
        log.exception("recording the notification for job %s failed", job.pk)


def operation_failed(job: UpgradeJob) -> NotificationEvent | None:
    """An upgrade or rollback on one node that failed, rolled back or was interrupted: told once per job.

    A fan-out's parent is not told: each node's job is, and the digest window gathers them.
    """
    if job.node_id is None:
        return None
    node = Node.objects.filter(pk=job.node_id).first()
    backend = Backend.objects.filter(pk=job.backend_id).first() if job.backend_id else None
    name = backend.name if backend else "a backend"
    outcome = {JobStatus.ROLLED_BACK: "was rolled back", JobStatus.INTERRUPTED: "was interrupted"}.get(
        JobStatus(job.status), "failed"
    )
    target = job.to_version or notify_digest(job.to_digest)
    what = f"{JobKind(job.kind).label.capitalize()} of {name}{f' to {target}' if target else ''}"
    return NotificationEvent.record(
        Kind.OPERATION_FAILED,
        f"job-failed:{job.pk}",
        title=f"{what} {outcome} on {node or 'an unknown node'}",
        severity="failure",
        where=node.name if node else "",
        why=job.error or job.message,
        link=job_link(job),
        backend=backend,
        node=node,
        job=job,
    )


def check_streak(job: UpgradeJob | None = None) -> NotificationEvent | None:
    """The upgrade check failed (or partly failed) PORTAL_NOTIFY_CHECK_FAILURES times in a row: told
    once per streak (the key is the streak's first check); a check that succeeds ends the streak."""
    needed = settings.PORTAL_NOTIFY_CHECK_FAILURES
    if needed <= 0:
        return None
    checks = UpgradeJob.objects.filter(kind=JobKind.CHECK, status__in=JobStatus.FINISHED).exclude(
        status=JobStatus.CANCELLED
    )
    last_ok = checks.filter(status=JobStatus.SUCCEEDED).order_by("-pk").values_list("pk", flat=True).first()
    streak = checks.filter(status__in=CHECK_FAILURES)
    if last_ok is not None:
        streak = streak.filter(pk__gt=last_ok)
    count = streak.count()
    if count < needed:
        return None
    first = streak.order_by("pk").first()
    latest = streak.order_by("-pk").first()
    assert first is not None and latest is not None
    return NotificationEvent.record(
        Kind.CHECK_FAILING,
        f"check-failing:{first.pk}",
        title=f"The upgrade check failed {count} times in a row",
        severity="failure",
        where=latest.node.name if latest.node_id and latest.node else "every node",
        why=latest.error or latest.message,
        link=job_link(latest),
        job=latest,
    )


def notify_digest(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def watch(now: dt.datetime | None = None) -> int:
    """Record what the portal's state shows now; returns how many new events. Safe to run any time,
    from any process: what was recorded before is not recorded again."""
    now = now or timezone.now()
    return upgrades_available() + nodes_offline(now) + drift() + galleries_failing()


def _unknown(keys: dict[str, Any]) -> dict[str, Any]:
    """The entries of `keys` whose key has no event yet (one query for all of them)."""
    known = set(NotificationEvent.objects.filter(key__in=list(keys)).values_list("key", flat=True))
    return {key: value for key, value in keys.items() if key not in known}


def upgrades_available() -> int:
    """One event per backend and available build (version and digest), however many checks see it."""
    flagged = (
        Backend.objects.upgradable()
        .select_related("gallery")
        .prefetch_related("installed__node")
        .order_by("name")
    )
    keys = {f"upgrade:{b.gallery.name}/{b.name}:{b.available_version}:{b.latest_digest}": b for b in flagged}
    made = 0
    for key, backend in _unknown(keys).items():
        current = backend.current_versions()
        installed = sorted({row.version or notify_digest(row.digest) or "?" for row in current})
        available = backend.available_version or notify_digest(backend.latest_digest)
        made += bool(
            NotificationEvent.record(
                Kind.UPGRADE_AVAILABLE,
                key,
                title=f"Upgrade available: {backend.name} {', '.join(installed)} \u2192 {available}",
                severity="info",
                where=", ".join(sorted({row.node.name for row in current})),
                why=backend.upgrade_reason,
                link=backend_link(backend),
                backend=backend,
            )
        )
    return made


def nodes_offline(now: dt.datetime) -> int:
    """A node whose worker stopped sending heartbeats: once per outage (the key holds the last beat)."""
    stale = Node.objects.filter(
        last_heartbeat_at__isnull=False, last_heartbeat_at__lt=now - HEARTBEAT_TIMEOUT
    )
    keys = {
        f"node-offline:{node.name}:{node.last_heartbeat_at.isoformat()}": node
        for node in stale
        if node.last_heartbeat_at is not None
    }
    made = 0
    for key, node in _unknown(keys).items():
        assert node.last_heartbeat_at is not None
        since = timezone.localtime(node.last_heartbeat_at).strftime("%Y-%m-%d %H:%M:%S %Z")
        made += bool(
            NotificationEvent.record(
                Kind.NODE_OFFLINE,
                key,
                title=f"Node {node.name} is offline",
                severity="failure",
                where=node.name,
                why=f"no heartbeat from its worker since {since} "
                f"(a node is offline after {int(HEARTBEAT_TIMEOUT.total_seconds())} s without one)",
                link=absolute(reverse("admin:backends_app_node_change", args=[node.pk])),
                node=node,
            )
        )
    return made


def drift() -> int:
    """A backend whose nodes run different builds (not while a job on it runs: a fan-out drifts on
    its way). Once per combination of builds."""
    rows = InstalledVersion.objects.filter(state=InstalledVersion.State.CURRENT, backend__isnull=False)
    builds: dict[int, dict[str, str]] = {}
    for backend_id, node_name, version, digest in rows.values_list(
        "backend_id", "node__name", "version", "digest"
    ):
        builds.setdefault(backend_id, {})[node_name] = digest or version
    drifting = {pk: nodes for pk, nodes in builds.items() if len(set(nodes.values())) > 1}
    if not drifting:
        return 0
    busy = set(
        UpgradeJob.objects.filter(backend_id__in=list(drifting), status__in=JobStatus.ACTIVE).values_list(
            "backend_id", flat=True
        )
    )
    backends = Backend.objects.select_related("gallery").in_bulk([pk for pk in drifting if pk not in busy])
    keys = {}
    for pk, backend in backends.items():
        signature = ",".join(f"{node}={build}" for node, build in sorted(drifting[pk].items()))
        fingerprint = hashlib.sha256(signature.encode()).hexdigest()[:16]
        keys[f"drift:{backend.gallery.name}/{backend.name}:{fingerprint}"] = backend
    made = 0
    versions = {
        (row.backend_id, row.node.name): row.version or notify_digest(row.digest)
        for row in rows.filter(backend_id__in=list(backends)).select_related("node")
    }
    for key, backend in _unknown(keys).items():
        nodes = sorted(drifting[backend.pk])
        made += bool(
            NotificationEvent.record(
                Kind.DRIFT,
                key,
                title=f"{backend.name} drifted: its nodes run different builds",
                severity="warning",
                where=", ".join(nodes),
                why="; ".join(f"{node} runs {versions.get((backend.pk, node), '?')}" for node in nodes)
                + ". Converge brings them to the same build.",
                link=backend_link(backend),
                backend=backend,
            )
        )
    return made


def galleries_failing() -> int:
    """An enabled gallery whose last sync failed: once per run of failures (the key holds the last
    successful sync, so a gallery that recovers and fails again is told again)."""
    failing = Gallery.objects.filter(enabled=True).exclude(last_error="")
    keys = {
        f"gallery-sync:{g.name}:{g.last_synced_at.isoformat() if g.last_synced_at else 'never'}": g
        for g in failing
    }
    made = 0
    for key, gallery in _unknown(keys).items():
        made += bool(
            NotificationEvent.record(
                Kind.GALLERY_FAILING,
                key,
                title=f"Gallery {gallery.name} cannot be synced",
                severity="warning",
                where=f"gallery {gallery.name} (its backends keep their last good entries)",
                why=gallery.last_error,
                link=absolute(reverse("admin:backends_app_gallery_change", args=[gallery.pk])),
            )
        )
    return made


# --- delivery -------------------------------------------------------------------------------------


def tick(now: dt.datetime | None = None) -> str:
    """The notification task: record what the state shows, then deliver what is due."""
    made = watch(now)
    return f"{made} new event(s); {deliver(now)}"  # a fresh `now`: the events just recorded are due


def deliver(now: dt.datetime | None = None) -> str:
    """Group the events that waited out the digest window into one message, then send every delivery
    that is due. Safe to run in several processes at once (rows are claimed with SKIP LOCKED)."""
    now = now or timezone.now()
    stale = give_up_stale_sends(now)
    message = bundle(now)
    sent = send_due(now)
    parts = [f"{'1 message made' if message else 'no message made'}", f"{sent} delivery attempt(s)"]
    if stale:
        parts.append(f"{stale} interrupted send(s) marked unknown")
    return ", ".join(parts)


def bundle(now: dt.datetime) -> NotificationMessage | None:
    """The waiting events as one message, once the oldest has waited PORTAL_NOTIFY_WINDOW seconds
    (so what arrives within the window goes together), with one delivery per enabled URL.

    With no URL enabled the message is still made (and shown in the admin), with no delivery: events
    are told when they happen, not replayed to a URL added later.
    """
    window = dt.timedelta(seconds=max(settings.PORTAL_NOTIFY_WINDOW, 0))
    with transaction.atomic():
        waiting = list(
            NotificationEvent.objects.select_for_update(skip_locked=True)
            .filter(message__isnull=True, created_at__lte=now)
            .order_by("created_at", "pk")
        )
        if not waiting or waiting[0].created_at > now - window:
            return None
        message = NotificationMessage.compose(waiting, now)
        NotificationEvent.objects.filter(pk__in=[e.pk for e in waiting]).update(message=message)
        NotificationDelivery.objects.bulk_create(
            NotificationDelivery(
                message=message,
                target=target,
                target_name=str(target)[:300],
                next_attempt_at=now,
                created_at=now,
            )
            for target in NotificationTarget.objects.filter(enabled=True)
        )
    return message


def give_up_stale_sends(now: dt.datetime) -> int:
    """Deliveries left "sending" by a process that died mid-send may have arrived: marked unknown,
    never resent."""
    limit = now - dt.timedelta(seconds=2 * settings.PORTAL_NOTIFY_TIMEOUT + 300)
    return NotificationDelivery.objects.filter(
        status=NotificationDelivery.Status.SENDING, last_attempt_at__lt=limit
    ).update(
        status=NotificationDelivery.Status.UNKNOWN,
        last_error="the process sending it stopped before recording the outcome: it may have been "
        "delivered, so it is not sent again",
    )


def send_due(now: dt.datetime) -> int:
    """Send the deliveries whose time has come, one Apprise call per message; returns how many."""
    with transaction.atomic():
        claimed = list(
            NotificationDelivery.objects.select_for_update(skip_locked=True)
            .filter(status__in=NotificationDelivery.WAITING, next_attempt_at__lte=now)
            .order_by("next_attempt_at", "pk")
            .only("pk", "message_id")
        )
        messages = list(dict.fromkeys(row.message_id for row in claimed))[:MESSAGES_PER_RUN]
        ids = [row.pk for row in claimed if row.message_id in messages]
        NotificationDelivery.objects.filter(pk__in=ids).update(
            status=NotificationDelivery.Status.SENDING, last_attempt_at=now, attempts=F("attempts") + 1
        )
    rows = list(
        NotificationDelivery.objects.filter(pk__in=ids).select_related("message", "target").order_by("pk")
    )
    by_message: dict[int, list[NotificationDelivery]] = {}
    for row in rows:
        by_message.setdefault(row.message_id, []).append(row)
    for group in by_message.values():
        _send_message(group, now)
    return len(rows)


def _send_message(group: list[NotificationDelivery], now: dt.datetime) -> None:
    message = group[0].message
    live = {str(row.pk): row.target.url for row in group if row.target is not None and row.target.enabled}
    try:
        outcomes = notify.send(
            live,
            title=message.title,
            body=message.body,
            kind=message.severity,
            timeout=settings.PORTAL_NOTIFY_TIMEOUT,
        )
    except Exception as exc:  # Apprise itself broke: nothing is known to have left
        log.exception("sending notification message %s failed", message.pk)
        outcomes = {
            key: notify.Outcome(notify.Result.FAILED, f"unexpected error: {type(exc).__name__}")
            for key in live
        }
    for row in group:
        outcome = outcomes.get(str(row.pk)) or notify.Outcome(
            notify.Result.INVALID, "the URL was removed or disabled before the message was sent", tries=0
        )
        row.record_outcome(outcome, now)


# --- the schedule ---------------------------------------------------------------------------------


def ensure_schedule() -> Any:
    """The notification task's django-q2 schedule (every minute); safe to call any time."""
    from django_q.models import Schedule

    row, _ = Schedule.objects.update_or_create(
        name=SCHEDULE_NAME,
        defaults={"func": TICK_TASK, "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1},
    )
    return row


def recent_deliveries(limit: int = 10) -> list[NotificationDelivery]:
    """The latest deliveries, for the settings page."""
    return list(NotificationDelivery.objects.select_related("message").order_by("-created_at", "-pk")[:limit])


def waiting_count() -> int:
    return NotificationEvent.objects.filter(message__isnull=True).count()


def target_status() -> dict[int, NotificationDelivery]:
    """Each target's latest delivery (for the settings page), in one query."""
    latest: dict[int, NotificationDelivery] = {}
    for row in NotificationDelivery.objects.filter(~Q(target=None)).order_by("-created_at", "-pk")[:500]:
        assert row.target_id is not None
        latest.setdefault(row.target_id, row)
    return latest
