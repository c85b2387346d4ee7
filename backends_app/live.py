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

from backends_app.models import JobStatus, UpgradeJob

log = logging.getLogger(__name__)

# Without a cross-process layer: how often an open job page reads its row. Bounds the delay from
# a progress update written by the worker to the page showing it (the product asks for 0.5 s).
POLL_SECONDS = 0.2
# With one: how often the row is re-read anyway, for changes that were never published.
RESYNC_SECONDS = 1.0
MESSAGE_TYPE = "job.update"

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
)


def group_name(job_id: int) -> str:
    return f"job-{job_id}"


def cross_process_layer() -> bool:
    """True when the channel layer reaches other processes (Redis), so publishing is worth it."""
    layer = get_channel_layer()
    return layer is not None and not isinstance(layer, InMemoryChannelLayer)


def snapshot(job: UpgradeJob) -> dict[str, Any]:
    """What the job page shows of a job, as JSON. `at` is when the state was taken (epoch seconds)."""
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
    state = snapshot(job)
    transaction.on_commit(lambda: _publish(job.pk, state))


def _publish(job_id: int, state: dict[str, Any]) -> None:
    try:
        async_to_sync(get_channel_layer().group_send)(
            group_name(job_id), {"type": MESSAGE_TYPE, "job": state}
        )
    except Exception:
        log.warning("could not publish job %s progress to the channel layer", job_id, exc_info=True)


def _load(job_id: int) -> dict[str, Any] | None:
    job = UpgradeJob.objects.filter(pk=job_id).first()
    return snapshot(job) if job else None


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

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4403)  # before accept: the handshake is refused (HTTP 403)
            return
        self.job_id = int(self.scope["url_route"]["kwargs"]["job_id"])
        state = await load_snapshot(self.job_id)
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
                state = await load_snapshot(self.job_id)
            except Exception:  # a database hiccup: try again next tick, keep the socket
                log.warning("job %s: could not read the job row", self.job_id, exc_info=True)
                continue
            if state is None:  # deleted
                await self.close()
                return
            await self.send_state(state)
            if not state["active"]:
                return

    async def job_update(self, event: dict[str, Any]) -> None:
        """A change published by the process running the job (`job_changed`)."""
        await self.send_state(event["job"])

    async def send_state(self, state: dict[str, Any]) -> None:
        """Send `state` unless the page has it already, or it is older than a final state sent."""
        shown = {key: value for key, value in state.items() if key != "at"}
        last = self.last_sent
        if last is not None and (shown == last or (not last["active"] and state["active"])):
            return
        self.last_sent = shown
        await self.send_json(state)


websocket_urlpatterns = [path("ws/jobs/<int:job_id>/", JobConsumer.as_asgi())]
