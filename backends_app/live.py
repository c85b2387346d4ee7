"""Live job progress over Channels: what a job change publishes, and the websocket that shows it.

Two deployment shapes, one consumer (docs/ui.md):

* With a cross-process channel layer (Redis, `REDIS_URL` set), the process running a job publishes
  every change of its row to the group ``job-<id>`` (`job_changed`, receiving the models' signal)
  and each open job page receives it at once, whichever replica serves it. The consumer also re-reads
  the row every `RESYNC_SECONDS`, for the changes that bypass `_update` (a job started or cancelled)
  and for a message lost while Redis was unreachable.
* With the in-memory layer (the embedded default) nothing can cross from the worker process to the
  web server, so the consumer reads the job row every `POLL_SECONDS` and sends only what changed.
  A read by primary key costs well under a millisecond, and only while a job page is open on an
  active job.

A state carries the job's log lines (`JobMessage`, stamped by the server) the page has not had yet,
and for a fan-out parent its children's states, so the parent's page shows each node's job change
as it happens: a child's change makes the parent's open pages read the parent and its children again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import transaction
from django.urls import path

from backends_app.models import JobMessage, JobStatus, UpgradeJob
from backends_app.templatetags.portal_format import format_moment

log = logging.getLogger(__name__)

# Without a cross-process layer: how often an open job page reads its row. Bounds the delay from
# a progress update written by the worker to the page showing it (the product asks for 0.5 s).
POLL_SECONDS = 0.2
# With one: how often the row is re-read anyway, for changes that were never published.
RESYNC_SECONDS = 1.0
MESSAGE_TYPE = "job.update"
#: Sent to a fan-out parent's group when one of its children changed: read them all again.
CHILD_MESSAGE_TYPE = "job.child"

# The fields of a job the page shows; a change to any other field is not worth a message.
SHOWN_FIELDS = (
    "status",
    "phase",
    "percent",
    "bytes_done",
    "bytes_total",
    "message",
    "error",
    "from_version",
    "to_version",
    "source",
    "started_at",
    "finished_at",
    "log",
)


def group_name(job_id: int) -> str:
    return f"job-{job_id}"


def cross_process_layer() -> bool:
    """True when the channel layer reaches other processes (Redis), so publishing is worth it."""
    layer = get_channel_layer()
    return layer is not None and not isinstance(layer, InMemoryChannelLayer)


def log_entry(entry: JobMessage) -> dict[str, Any]:
    """One log line as the pages show it; `at_display` is the server's time in the portal's format."""
    return {
        "id": entry.pk,
        "at": entry.at.isoformat(),
        "at_display": format_moment(entry.at),
        "phase": entry.phase,
        "kind": entry.kind,
        "text": entry.text,
    }


def child_state(child: UpgradeJob) -> dict[str, Any]:
    """A fan-out child as its parent's page lists it."""
    return {
        "id": child.pk,
        "node": str(child.node) if child.node_id and child.node else "",
        "status": child.status,
        "status_label": child.get_status_display(),
        "phase_label": child.get_phase_display(),
        "percent": child.percent,
        "active": child.status in JobStatus.ACTIVE,
        "error": child.error,
    }


def is_fan_out(job: UpgradeJob) -> bool:
    """A fan-out parent: an operation on a backend with no node of its own (its children have one)."""
    return job.backend_id is not None and job.node_id is None


def snapshot(
    job: UpgradeJob,
    *,
    log: list[JobMessage] | None = None,
    children: list[UpgradeJob] | None = None,
) -> dict[str, Any]:
    """What the job page shows of a job, as JSON. `at` is when the state was taken (epoch seconds).

    `log`: the log lines to send (those the reader has not had; the page skips any it has);
    `children`: a fan-out parent's jobs, one per node. `log_count` counts every line ever written,
    kept or not.
    """
    return {
        "id": job.pk,
        "kind": job.kind,
        "status": job.status,
        "status_label": job.get_status_display(),
        "phase": job.phase,
        "phase_label": job.get_phase_display(),
        "active": job.status in JobStatus.ACTIVE,
        "percent": job.percent,
        "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total,
        "message": job.message,
        "error": job.error,
        "from_version": job.from_version,
        "to_version": job.to_version,
        "source": job.source,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "started_at_display": format_moment(job.started_at),
        "finished_at_display": format_moment(job.finished_at),
        "log_count": job.log_count,
        "log": [log_entry(entry) for entry in log or ()],
        "fan_out": is_fan_out(job),
        "children": [child_state(child) for child in children or ()],
        "at": time.time(),
    }


def job_changed(sender: Any, job: UpgradeJob, fields: tuple[str, ...], **kwargs: Any) -> None:
    """Publish a job's new state to its page(s), once the change is committed.

    Receives `models.job_changed`, sent by `UpgradeJob._update` in whatever process runs the job.
    Does nothing without a cross-process layer (the consumer polls then). A channel-layer failure is
    logged and never reaches the job: progress display is not worth failing an upgrade for.
    """
    if not set(fields) & set(SHOWN_FIELDS):
        return
    try:
        if not cross_process_layer():
            return
    except Exception:
        log.warning("channel layer unavailable; job %s page updates by polling only", job.pk, exc_info=True)
        return
    state = snapshot(job, log=getattr(job, "new_log_entries", None))
    parent_id = job.parent_id
    transaction.on_commit(lambda: _publish(job.pk, state, parent_id))


def _publish(job_id: int, state: dict[str, Any], parent_id: int | None = None) -> None:
    try:
        send = async_to_sync(get_channel_layer().group_send)
        send(group_name(job_id), {"type": MESSAGE_TYPE, "job": state})
        if parent_id is not None:
            send(group_name(parent_id), {"type": CHILD_MESSAGE_TYPE, "child": job_id})
    except Exception:
        log.warning("could not publish job %s progress to the channel layer", job_id, exc_info=True)


def _load(job_id: int, after_log_id: int = 0, known_log_count: int = -1) -> dict[str, Any] | None:
    """The job's state, with its log lines after `after_log_id` (read only when `log_count` moved
    from `known_log_count`) and, for a fan-out parent, its children."""
    job = UpgradeJob.objects.filter(pk=job_id).first()
    if job is None:
        return None
    entries = None
    if job.log_count != known_log_count:
        entries = list(JobMessage.objects.filter(job_id=job_id, pk__gt=after_log_id).order_by("id"))
    children = None
    if is_fan_out(job):
        children = list(job.children.select_related("node").order_by("id"))
    return snapshot(job, log=entries, children=children)


load_snapshot = database_sync_to_async(_load)


class JobConsumer(AsyncJsonWebsocketConsumer):
    """`/ws/jobs/<id>/`: the job's state on connect, then every change, until it is finished.

    Signed-in users only (the session cookie, through `AuthMiddlewareStack`); the origin is checked
    by `AllowedHostsOriginValidator` in portal/asgi.py.
    """

    job_id: int
    last_sent: dict[str, Any] | None = None
    poller: asyncio.Task[None] | None = None
    joined: bool = False
    last_log_id: int = 0
    log_count: int = -1

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4403)  # before accept: the handshake is refused (HTTP 403)
            return
        self.job_id = int(self.scope["url_route"]["kwargs"]["job_id"])
        state = await self.load()
        if state is None:
            await self.close(code=4404)
            return
        await self.channel_layer.group_add(group_name(self.job_id), self.channel_name)
        self.joined = True
        await self.accept()
        await self.send_state(state)
        if state["active"]:
            self.poller = asyncio.create_task(self.poll())

    async def disconnect(self, code: int) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        if self.joined:
            await self.channel_layer.group_discard(group_name(self.job_id), self.channel_name)

    async def poll(self) -> None:
        interval = RESYNC_SECONDS if cross_process_layer() else POLL_SECONDS
        while True:
            await asyncio.sleep(interval)
            try:
                state = await self.load()
            except Exception:  # a database hiccup: try again next tick, keep the socket
                log.warning("job %s: could not read the job row", self.job_id, exc_info=True)
                continue
            if state is None:  # deleted
                await self.close()
                return
            await self.send_state(state)
            if not state["active"]:
                return

    async def load(self) -> dict[str, Any] | None:
        """The job's state from the database, with the log lines this page has not had."""
        return await load_snapshot(self.job_id, self.last_log_id, self.log_count)

    async def job_update(self, event: dict[str, Any]) -> None:
        """A change published by the process running the job (`job_changed`)."""
        state = event["job"]
        if state.get("fan_out"):  # its children come from the database
            await self.job_child(event)
            return
        if state["log_count"] > self.log_count + len(state["log"]):
            self.log_count = -1  # a line was missed (published while Redis was away): read them
            await self.job_child(event)
            return
        await self.send_state(state)

    async def job_child(self, event: dict[str, Any]) -> None:
        """A fan-out child changed (or the state needs the database): read it all again."""
        try:
            state = await self.load()
        except Exception:
            log.warning("job %s: could not read the job row", self.job_id, exc_info=True)
            return
        if state is not None:
            await self.send_state(state)

    async def send_state(self, state: dict[str, Any]) -> None:
        """Send `state` unless the page has it already, or it is older than a final state sent.

        Log lines the page already had are left out; new ones are always sent.
        """
        state = {**state, "log": [entry for entry in state["log"] if entry["id"] > self.last_log_id]}
        shown = {key: value for key, value in state.items() if key not in ("at", "log")}
        last = self.last_sent
        if last is not None and not last["active"] and state["active"]:
            return
        if last is not None and shown == last and not state["log"]:
            return
        self.last_sent = shown
        if state["log"]:
            self.last_log_id = state["log"][-1]["id"]
        self.log_count = max(self.log_count, state["log_count"])
        await self.send_json(state)


websocket_urlpatterns = [path("ws/jobs/<int:job_id>/", JobConsumer.as_asgi())]


def page_context(job: UpgradeJob) -> dict[str, Any]:
    """What `templates/includes/job_live.html` shows of a job (the job page and the admin's job view):
    its state for the script, its kept log with how many lines were dropped, and its children."""
    log = list(job.log.order_by("id"))
    children = list(job.children.select_related("backend", "node").order_by("id"))
    return {
        "job": job,
        "state": snapshot(job, children=children),
        "log": log,
        "log_head": JobMessage.HEAD,
        "log_dropped": max(0, job.log_count - len(log)),
        "children": children,
    }
