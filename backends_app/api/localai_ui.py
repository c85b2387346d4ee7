"""The routes LocalAI's web UI calls (core/http/routes/ui_api.go), at its paths, with its JSON.

- `GET /api/backends?page&items&sort&order&term&tag`: the paged catalog of gallery entries;
- `POST /api/backends/install/<id>`, `/api/backends/delete/<id>`, `/api/backends/upgrade/<name>`,
  `/api/backends/install-external`: a job, answered with its `jobID`;
- `POST /api/backends/system/delete/<name>`: an uninstall that answers when it is done;
- `GET /api/backends/job/<uid>`: a job's state (an unknown id reads as queued, as LocalAI answers);
- `GET /api/backends/upgrades`, `POST /api/backends/upgrades/check`: the upgrades map;
- `GET /api/operations`: the operations under way, with progress; `POST /api/operations/<jobID>/
  cancel|pause|dismiss`; `GET|DELETE /api/operations/history`.

LocalAI builds these answers from Go maps, so their keys come in byte order (`go_map`); a handler's
error is a flat `{"error": "..."}`, while sign-in, permission, CSRF and method errors come in the
envelope its web framework writes (`FRAMEWORK_ERRORS`). The portal's job table stands in for
LocalAI's in-memory operation cache: every queued or running backend operation is listed, whoever
asked for it, and it leaves the list when it ends.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
from pathlib import Path
from typing import Any

from django.db.models import Prefetch, QuerySet
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from backends_app import jobs, oci
from backends_app.api.errors import BadRequest
from backends_app.api.localai import (
    BACKEND_NAME,
    FRAMEWORK_ERRORS,
    GALLERY_CONFIG_SCHEMA,
    NODE_PROGRESS_SCHEMA,
    UPGRADES_MAP,
    LocalAIView,
    Refused,
    backend_named,
    cancellable,
    current_rows,
    failed,
    gallery_config,
    gallery_entries,
    go_map,
    installed_backends,
    installed_names,
    is_distributed,
    job_by_uuid,
    job_error,
    job_message,
    job_progress,
    node_progress,
    node_ref,
    request_operation,
    upgrades_map,
)
from backends_app.api.serializers import JsonBodySerializer
from backends_app.api.views import no_body_fields, requested_by
from backends_app.models import (
    Backend,
    Gallery,
    JobKind,
    JobStatus,
    Node,
    OperationRefused,
    PortalSettings,
    UpgradeJob,
)

#: How many finished operations `GET /api/operations/history` lists (LocalAI keeps 50).
HISTORY_SIZE = 50
DEFAULT_PAGE_SIZE = 9
UI_ERROR = inline_serializer("LocalAIUIError", fields={"error": serializers.CharField()})


class LocalAIUIView(LocalAIView):
    """A route of LocalAI's web UI: a handler's error is `{"error": "..."}`; what LocalAI's framework
    refuses before the handler (sign-in, permission, CSRF, method, body size) keeps the envelope."""

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, exceptions.ParseError | exceptions.UnsupportedMediaType):
            exc = BadRequest(f"invalid request body: {exc.detail}")
        return super().handle_exception(exc)

    def error_data(self, exc: Exception, code: int, message: str) -> dict[str, Any]:
        if isinstance(exc, FRAMEWORK_ERRORS):
            return super().error_data(exc, code, message)
        return {"error": message}


RESPONSES = {400: UI_ERROR, 404: UI_ERROR, 409: UI_ERROR}


def started(job: UpgradeJob, message: str, **extra: str) -> Response:
    return Response(go_map({"jobID": str(job.uuid), "message": message, **extra}))


# --- operations ----------------------------------------------------------------------------------------


def live_operations() -> list[UpgradeJob]:
    """Backend operations queued or running (a fan-out once, with its nodes), whoever asked."""
    return list(
        UpgradeJob.objects.filter(status__in=JobStatus.ACTIVE, parent__isnull=True)
        .exclude(kind=JobKind.CHECK)
        .select_related("backend__gallery", "node")
        .prefetch_related(Prefetch("children", queryset=UpgradeJob.objects.select_related("node")))
    )


def operation_key(job: UpgradeJob) -> str:
    """What LocalAI keys an operation by: the name it was asked for; here always `gallery@name`."""
    if job.backend is None:
        return f"job-{job.uuid}"
    return f"{job.backend.gallery.name}@{job.backend.name}"


def task_type(job: UpgradeJob) -> str:
    return "Deletion" if job.kind == JobKind.UNINSTALL else "Installation"


def operation(job: UpgradeJob) -> dict[str, Any]:
    """A live job as an element of LocalAI's `/api/operations` (keys in byte order)."""
    key = operation_key(job)
    body: dict[str, Any] = {
        "cancellable": cancellable(job),
        "fullName": key,
        "id": key,
        "isBackend": True,
        "isDeletion": job.kind == JobKind.UNINSTALL,
        "isQueued": job.status == JobStatus.QUEUED,
        "jobID": str(job.uuid),
        "message": job_message(job),
        "name": job.backend.name if job.backend else key,
        "phase": job.phase,
        "progress": int(job_progress(job)),
        "taskType": "deletion" if job.kind == JobKind.UNINSTALL else "Installation",
    }
    if job.bytes_done > 0:
        body["currentBytes"] = job.bytes_done
    if job.bytes_total > 0:
        body["totalBytes"] = job.bytes_total
    if failed(job):
        body["error"] = job_error(job)
    if job.node is not None and job.node.queue:
        body["nodeID"] = job.node.name
    nodes = node_progress(job)
    if nodes:
        body["nodes"] = [go_map(node) for node in nodes]  # maps here in LocalAI, a struct in OpStatus
    return go_map(body)


def rfc3339_nano(moment: dt.datetime | None) -> str:
    """Go's `time.RFC3339Nano`: fraction without trailing zeros, `Z` for UTC."""
    if moment is None:
        return "0001-01-01T00:00:00Z"
    text = moment.astimezone(dt.UTC).isoformat()
    stamp, _, _ = text.partition("+")
    if "." in stamp:
        stamp = stamp.rstrip("0").rstrip(".")
    return stamp + "Z"


def history_record(job: UpgradeJob) -> dict[str, Any]:
    """A finished job as LocalAI's `OpRecord` (struct order)."""
    key = operation_key(job)
    if job.status == JobStatus.SUCCEEDED:
        outcome = "completed"
    elif job.status == JobStatus.CANCELLED:
        outcome = "cancelled"
    else:
        outcome = "failed"
    record: dict[str, Any] = {
        "id": key,
        "name": job.backend.name if job.backend else key,
        "jobID": str(job.uuid),
        "isBackend": True,
    }
    if job.node is not None and job.node.queue:
        record["nodeID"] = job.node.name
    record["taskType"] = "deletion" if job.kind == JobKind.UNINSTALL else "installation"
    record["outcome"] = outcome
    if outcome == "failed":
        record["error"] = job_error(job)
    record["startedAt"] = rfc3339_nano(job.started_at or job.created_at)
    record["finishedAt"] = rfc3339_nano(job.finished_at)
    return record


def finished_operations() -> QuerySet[UpgradeJob]:
    return (
        UpgradeJob.objects.filter(status__in=JobStatus.FINISHED, parent__isnull=True)
        .exclude(kind=JobKind.CHECK)
        .select_related("backend__gallery", "node")
        .order_by("-finished_at", "-id")
    )


OPERATION_SCHEMA = {
    "type": "object",
    "required": [
        "cancellable",
        "fullName",
        "id",
        "isBackend",
        "isDeletion",
        "isQueued",
        "jobID",
        "message",
        "name",
        "progress",
        "taskType",
    ],
    "properties": {
        "cancellable": {"type": "boolean"},
        "currentBytes": {"type": "integer"},
        "error": {"type": "string"},
        "fullName": {"type": "string"},
        "id": {"type": "string", "description": "`gallery@name`."},
        "isBackend": {"type": "boolean"},
        "isDeletion": {"type": "boolean"},
        "isQueued": {"type": "boolean"},
        "jobID": {"type": "string", "format": "uuid"},
        "message": {"type": "string"},
        "name": {"type": "string"},
        "nodeID": {"type": "string"},
        "nodes": NODE_PROGRESS_SCHEMA,
        "phase": {"type": "string"},
        "progress": {"type": "integer"},
        "taskType": {"type": "string", "enum": ["Installation", "deletion"]},
        "totalBytes": {"type": "integer"},
    },
}
OP_RECORD_SCHEMA = {
    "type": "object",
    "required": ["id", "name", "jobID", "isBackend", "taskType", "outcome", "startedAt", "finishedAt"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "jobID": {"type": "string", "format": "uuid"},
        "isBackend": {"type": "boolean"},
        "nodeID": {"type": "string"},
        "taskType": {"type": "string", "enum": ["installation", "deletion"]},
        "outcome": {"type": "string", "enum": ["completed", "failed", "cancelled"]},
        "error": {"type": "string"},
        "startedAt": {"type": "string", "format": "date-time"},
        "finishedAt": {"type": "string", "format": "date-time"},
    },
}
SUCCESS = inline_serializer(
    "LocalAISuccess", fields={"message": serializers.CharField(), "success": serializers.BooleanField()}
)
JOB_ID = OpenApiParameter("job_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="The job's `jobID`.")


USECASES_FILE = Path(__file__).with_name("localai_usecases.json")


@functools.cache
def backend_usecases() -> dict[str, list[str] | None]:
    """LocalAI's table of the model use cases (as its gallery's filter keys) each backend can serve;
    None where it names none, as Go marshals a nil slice. A copy of LocalAI's own (see the file)."""
    data = json.loads(USECASES_FILE.read_text())
    return dict(sorted(data["usecases"].items()))


class UsecasesView(LocalAIUIView):
    """LocalAI's `GET /api/backends/usecases`: its static table, which its model gallery reads to grey
    out the use-case filters a selected backend cannot serve."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: model use cases by backend",
        description="LocalAI's static table (core/config/backend_capabilities.go at 82c191a): each "
        "backend name to the sorted use-case filter keys it can serve (`chat`, `tts`, ...), `null` "
        "for none. The same whatever is installed.",
        responses={
            200: OpenApiResponse(
                {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": {"type": "string"}, "nullable": True},
                }
            )
        },
    )
    def get(self, request: Request) -> Response:
        return Response(backend_usecases())


class OperationsView(LocalAIUIView):
    """LocalAI's `GET /api/operations`: what is queued or running, with progress."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: operations under way",
        description="Every queued or running install, upgrade, rollback or uninstall (a fan-out once, "
        "with `nodes`), sorted by progress then id. An operation leaves the list when it ends; "
        "`/api/operations/history` has it then.",
        responses={
            200: OpenApiResponse(
                {
                    "type": "object",
                    "required": ["operations"],
                    "properties": {"operations": {"type": "array", "items": OPERATION_SCHEMA}},
                }
            )
        },
    )
    def get(self, request: Request) -> Response:
        operations = [operation(job) for job in live_operations()]
        operations.sort(key=lambda op: (op["progress"], op["id"]))
        return Response({"operations": operations})


class OperationCancelView(LocalAIUIView):
    """LocalAI's `POST /api/operations/<jobID>/cancel` (and `/pause`, which is a cancel here)."""

    paused = False

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: cancel an operation",
        description="A queued operation is cancelled at once; a running one stops at its next safe "
        "point, before it touches the installed backend. `pause` does the same: the portal keeps no "
        "partial download to resume.",
        parameters=[JOB_ID],
        request=None,
        responses={200: SUCCESS, 400: UI_ERROR},
    )
    def post(self, request: Request, job_id: str) -> Response:
        no_body_fields(request)
        job = job_by_uuid(job_id)
        if job is None or not job.is_active:
            raise BadRequest(f'operation "{job_id}" not found or already completed')
        if job.cancel_requested:
            raise BadRequest(f'operation "{job_id}" is already cancelled')
        if not cancellable(job):
            raise BadRequest(
                f'operation "{job_id}" can no longer be cancelled: it is changing the installed backend'
            )
        job.cancel(by=requested_by(request))
        if self.paused:
            message = (
                "Operation cancelled: the portal keeps no partial download, installing again starts over"
            )
        else:
            message = "Operation cancelled"
        return Response(go_map({"success": True, "message": message}))


class OperationPauseView(OperationCancelView):
    paused = True

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: pause an operation (cancels it)",
        description="As cancel: the portal keeps no partial download, so installing again starts over.",
        parameters=[JOB_ID],
        request=None,
        responses={200: SUCCESS, 400: UI_ERROR},
    )
    def post(self, request: Request, job_id: str) -> Response:
        return super().post(request, job_id)


class OperationDismissView(LocalAIUIView):
    """LocalAI's `POST /api/operations/<jobID>/dismiss`: acknowledge an operation."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: dismiss an operation",
        description="Always 200, as LocalAI. Finished operations already left the list (their outcome "
        "is in the history), so there is nothing to remove.",
        parameters=[JOB_ID],
        request=None,
        responses={200: SUCCESS},
    )
    def post(self, request: Request, job_id: str) -> Response:
        no_body_fields(request)
        return Response(go_map({"success": True, "message": "Operation dismissed"}))


class OperationHistoryView(LocalAIUIView):
    """LocalAI's `GET /api/operations/history`; `DELETE` is refused: the jobs are the audit trail."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: finished operations",
        description=f"The {HISTORY_SIZE} most recent, newest first.",
        responses={
            200: OpenApiResponse(
                {
                    "type": "object",
                    "required": ["operations"],
                    "properties": {"operations": {"type": "array", "items": OP_RECORD_SCHEMA}},
                }
            )
        },
    )
    def get(self, request: Request) -> Response:
        records = [history_record(job) for job in finished_operations()[:HISTORY_SIZE]]
        return Response({"operations": records})

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: clear the history (refused)",
        description="409: every job is kept as the record of what changed on which node; the admin and "
        "`/api/v1/jobs/` list them all.",
        responses={409: UI_ERROR},
    )
    def delete(self, request: Request) -> Response:
        raise Refused(
            "the portal keeps every finished operation as its audit trail and does not clear it; "
            "the admin and /api/v1/jobs/ list them all"
        )


# --- the catalog ---------------------------------------------------------------------------------------


def fuzzy_match(needle: str, haystack: str) -> bool:
    """lithammer/fuzzy's Match, as LocalAI's search uses it: the needle's characters appear in the
    haystack in order ("lcp" matches "llama-cpp")."""
    rest = iter(haystack)
    return all(char in rest for char in needle)


def matches(backend: Backend, term: str) -> bool:
    """LocalAI's `GalleryElements.Search` (core/gallery/gallery.go)."""
    name, gallery = backend.name.lower(), backend.gallery.name.lower()
    return (
        fuzzy_match(term, name)
        or fuzzy_match(term, gallery)
        or term in name
        or term in backend.description.lower()
        or term in gallery
        or term in ",".join(backend.tags).lower()
    )


def sorted_entries(entries: list[Backend], by: str, order: str, installed: set[str]) -> list[Backend]:
    """LocalAI's sorts: name, repository (gallery), license (empty last), status (installed first)."""
    keys = {
        "name": lambda b: b.name.lower(),
        "repository": lambda b: b.gallery.name.lower(),
        "license": lambda b: (b.license == "", b.license.lower()),
        "status": lambda b: (b.name not in installed, b.name.lower()),
    }
    key = keys.get(by)
    if key is None:
        return entries
    return sorted(entries, key=key, reverse=order == "desc")


def positive_int(value: str | None, default: int) -> int:
    """Go's `strconv.Atoi` with LocalAI's fallback: anything but a whole number >= 1 is the default."""
    text = (value or "").strip()
    digits = text.lstrip("+-")
    try:
        number = int(text) if digits.isascii() and digits.isdigit() and len(text) - len(digits) <= 1 else 0
    except ValueError:  # more digits than Python converts
        number = 0
    return number if number >= 1 else default


BACKEND_ENTRY_SCHEMA = {
    "type": "object",
    "properties": {
        "capabilities": {"type": "object", "nullable": True, "additionalProperties": {"type": "string"}},
        "description": {"type": "string"},
        "gallery": {"type": "string"},
        "icon": {"type": "string"},
        "id": {"type": "string", "description": "`gallery@name`."},
        "installed": {"type": "boolean"},
        "isAlias": {"type": "boolean"},
        "isDeletion": {"type": "boolean"},
        "isDevelopment": {"type": "boolean"},
        "isMeta": {"type": "boolean"},
        "jobID": {"type": "string"},
        "license": {"type": "string"},
        "metaBackendFor": {"type": "string"},
        "name": {"type": "string"},
        "nodes": {"type": "array", "nullable": True, "items": {"type": "object"}},
        "processing": {"type": "boolean"},
        "tags": {"type": "array", "nullable": True, "items": {"type": "string"}},
        "urls": {"type": "array", "nullable": True, "items": {"type": "string"}},
        "version": {"type": "string"},
    },
}
CATALOG_SCHEMA = {
    "type": "object",
    "properties": {
        "allTags": {"type": "array", "items": {"type": "string"}},
        "availableBackends": {"type": "integer"},
        "backends": {"type": "array", "items": BACKEND_ENTRY_SCHEMA},
        "currentPage": {"type": "integer"},
        "installedBackends": {"type": "integer"},
        "nextPage": {"type": "integer"},
        "preferDevelopmentBackends": {"type": "boolean"},
        "prevPage": {"type": "integer"},
        "processingBackends": {"type": "object", "additionalProperties": {"type": "string"}},
        "repositories": {"type": "array", "items": GALLERY_CONFIG_SCHEMA},
        "systemCapability": {"type": "string"},
        "taskTypes": {"type": "object", "additionalProperties": {"type": "string"}},
        "totalPages": {"type": "integer"},
    },
}


class CatalogView(LocalAIUIView):
    """LocalAI's `GET /api/backends`: every gallery entry, searched, sorted and paged."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: the backend catalog",
        description="All entries of every gallery followed (not filtered by capability), marked "
        "installed and processing, filtered by `tag` and `term`, sorted, paged (`items` per page, "
        "default 9).",
        parameters=[
            OpenApiParameter("page", OpenApiTypes.STR, description="1, 2, ... (anything else: 1)."),
            OpenApiParameter("items", OpenApiTypes.STR, description="Page size (anything else: 9)."),
            OpenApiParameter("term", OpenApiTypes.STR, description="Search in names, descriptions, tags."),
            OpenApiParameter("tag", OpenApiTypes.STR, description="Only entries with this tag (any case)."),
            OpenApiParameter(
                "sort",
                OpenApiTypes.STR,
                description="`name`, `repository`, `license` or `status` (installed first); anything else "
                "keeps the galleries' order.",
            ),
            OpenApiParameter(
                "order", OpenApiTypes.STR, description="`desc` reverses; anything else is `asc`."
            ),
        ],
        responses={200: OpenApiResponse(CATALOG_SCHEMA)},
    )
    def get(self, request: Request) -> Response:
        params = request.query_params
        page = positive_int(params.get("page"), 1)
        items = positive_int(params.get("items"), DEFAULT_PAGE_SIZE)
        term = params.get("term", "").lower()
        tag = params.get("tag", "").lower()

        entries = list(gallery_entries())
        rows = current_rows()
        installed = installed_names(rows)
        nodes: dict[str, list[dict[str, Any]]] | None = None
        if is_distributed():
            nodes = {}
            for row in rows:
                nodes.setdefault(row.name, []).append(node_ref(row))
        live = live_operations()
        active = {job.backend_id: job for job in live if job.backend_id is not None}
        aliased = {
            target for backend in entries if backend.is_meta for target in backend.capabilities.values()
        }
        all_tags = sorted({tag for backend in entries for tag in backend.tags})

        if tag:
            entries = [b for b in entries if any(t.lower() == tag for t in b.tags)]
        if term:
            entries = [b for b in entries if matches(b, term)]
        entries = sorted_entries(entries, params.get("sort", ""), params.get("order", "asc"), installed)
        total = len(entries)
        total_pages = math.ceil(total / items)
        start = min((page - 1) * items, total)
        page_entries = entries[start : start + items]
        meta_of: dict[str, str] = {}  # a concrete's meta on this page (LocalAI's metaParentOf)
        for meta in (b for b in page_entries if b.is_meta):
            for concrete in meta.capabilities.values():
                meta_of.setdefault(concrete, meta.name)

        shown, seen = [], set()
        for backend in page_entries:
            ident = f"{backend.gallery.name}@{backend.name}"
            if ident in seen:
                continue
            seen.add(ident)
            job = active.get(backend.pk)
            raw = backend.entry if isinstance(backend.entry, dict) else {}
            shown.append(
                go_map(
                    {
                        "capabilities": go_map(backend.capabilities) or None,
                        "description": backend.description,
                        "gallery": backend.gallery.name,
                        "icon": backend.icon,
                        "id": ident,
                        "installed": backend.name in installed,
                        "isAlias": backend.name in aliased,
                        "isDeletion": job is not None and job.kind == JobKind.UNINSTALL,
                        "isDevelopment": backend.is_development,
                        "isMeta": backend.is_meta,
                        "jobID": str(job.uuid) if job else "",
                        "license": backend.license,
                        "metaBackendFor": meta_of.get(backend.name, ""),
                        "name": backend.name,
                        "nodes": None if nodes is None else nodes.get(backend.name),
                        "processing": job is not None,
                        "tags": list(backend.tags) if "tags" in raw else None,
                        "urls": raw.get("urls") if isinstance(raw.get("urls"), list) else None,
                        "version": backend.version,
                    }
                )
            )
        galleries = Gallery.objects.filter(enabled=True).order_by("name")
        return Response(
            go_map(
                {
                    "allTags": all_tags,
                    "availableBackends": total,
                    "backends": shown,
                    "currentPage": page,
                    "installedBackends": len(installed_backends(rows)),
                    "nextPage": min(page + 1, total_pages),
                    "preferDevelopmentBackends": PortalSettings.prefer_development_backends(),
                    "prevPage": max(1, page - 1),
                    "processingBackends": go_map({operation_key(job): str(job.uuid) for job in live}),
                    "repositories": [gallery_config(gallery) for gallery in galleries],
                    "systemCapability": Node.local().capability,
                    "taskTypes": go_map({operation_key(job): task_type(job) for job in live}),
                    "totalPages": total_pages,
                }
            )
        )


# --- operations on backends ----------------------------------------------------------------------------


class InstallView(LocalAIUIView):
    """LocalAI's `POST /api/backends/install/<id>`: install, or reinstall, a backend."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: install or reinstall a backend",
        description="`id` is a name or `gallery@name`. An installed backend is installed again (the UI's "
        "Reinstall). When an operation on it is already queued or running, its `jobID` comes back.",
        parameters=[OpenApiParameter("id", OpenApiTypes.STR, OpenApiParameter.PATH)],
        request=None,
        responses={
            200: inline_serializer(
                "LocalAIJobStarted",
                fields={"jobID": serializers.UUIDField(), "message": serializers.CharField()},
            ),
            **RESPONSES,
        },
    )
    def post(self, request: Request, id: str) -> Response:
        backend = backend_named(id)
        no_body_fields(request)
        job = request_operation(backend, JobKind.INSTALL, request, force=True)
        return started(job, "Backend installation started")


class DeleteView(LocalAIUIView):
    """LocalAI's `POST /api/backends/delete/<id>`: uninstall a backend, as a job."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: uninstall a backend",
        parameters=[OpenApiParameter("id", OpenApiTypes.STR, OpenApiParameter.PATH)],
        request=None,
        responses={
            200: inline_serializer(
                "LocalAIDeletionStarted",
                fields={"jobID": serializers.UUIDField(), "message": serializers.CharField()},
            ),
            **RESPONSES,
        },
    )
    def post(self, request: Request, id: str) -> Response:
        backend = backend_named(id)
        no_body_fields(request)
        job = request_operation(backend, JobKind.UNINSTALL, request)
        return started(job, "Backend deletion started")


class SystemDeleteView(LocalAIUIView):
    """LocalAI's `POST /api/backends/system/delete/<name>`: uninstall, answering when it is done."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: uninstall a backend now",
        description="On one machine the uninstall runs in the request, as in LocalAI: 200 when it is "
        "done, 500 with the reason when it failed. With worker nodes it is queued to each node that "
        "has the backend and the answer names the job (`jobID`).",
        parameters=[BACKEND_NAME],
        request=None,
        responses={200: SUCCESS, 500: UI_ERROR, **RESPONSES},
    )
    def post(self, request: Request, name: str) -> Response:
        backend = backend_named(name)
        no_body_fields(request)
        try:
            job, created = backend.request(JobKind.UNINSTALL, requested_by=requested_by(request), queue=False)
        except OperationRefused as exc:
            raise Refused(str(exc)) from None
        if not created:
            raise Refused(
                f"{backend.name} is busy with another operation ({job.kind}, {job.status}); "
                "try again when it ends"
            )
        if job.node_id is None:  # a fan-out: the nodes' workers do it
            return Response(
                go_map({"success": True, "message": "Backend deletion started", "jobID": str(job.uuid)})
            )
        job = jobs.run(job.pk)
        if job.status != JobStatus.SUCCEEDED:
            return Response({"error": job_error(job)}, status=500)
        return Response(go_map({"success": True, "message": "Backend deleted successfully"}))


class JobView(LocalAIUIView):
    """LocalAI's `GET /api/backends/job/<uid>`: one operation's state."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: an operation's state",
        description="Always 200. An unknown id reads as an operation not started yet (`queued: true`), "
        "as in LocalAI; `completed` and `error` only when the operation succeeded or failed.",
        parameters=[OpenApiParameter("uid", OpenApiTypes.STR, OpenApiParameter.PATH)],
        responses={
            200: OpenApiResponse(
                {
                    "type": "object",
                    "required": [
                        "deletion",
                        "galleryElementName",
                        "message",
                        "processed",
                        "progress",
                        "queued",
                    ],
                    "properties": {
                        "completed": {"type": "boolean"},
                        "deletion": {"type": "boolean"},
                        "error": {"type": "string"},
                        "galleryElementName": {"type": "string"},
                        "message": {"type": "string"},
                        "processed": {"type": "boolean"},
                        "progress": {"type": "number"},
                        "queued": {"type": "boolean"},
                    },
                }
            )
        },
    )
    def get(self, request: Request, uid: str) -> Response:
        job = job_by_uuid(uid)
        if job is None:
            return Response(
                go_map(
                    {
                        "deletion": False,
                        "galleryElementName": "",
                        "message": "Operation queued",
                        "processed": False,
                        "progress": 0,
                        "queued": True,
                    }
                )
            )
        body: dict[str, Any] = {
            "deletion": job.kind == JobKind.UNINSTALL,
            "galleryElementName": job.backend.name if job.backend else "",
            "message": job_message(job),
            "processed": job.status in JobStatus.FINISHED,
            "progress": 100.0 if job.status == JobStatus.SUCCEEDED else job_progress(job),
            "queued": False,
        }
        if failed(job):
            body["error"] = job_error(job)
        if job.status == JobStatus.SUCCEEDED:
            body["completed"] = True
        return Response(go_map(body))


class UpgradesView(LocalAIUIView):
    """LocalAI's `GET /api/backends/upgrades`: the upgrades map."""

    @extend_schema(
        tags=["localai-ui"], summary="LocalAI UI: backends with an upgrade", responses={200: UPGRADES_MAP}
    )
    def get(self, request: Request) -> Response:
        return Response(upgrades_map())


class CheckUpgradesView(LocalAIUIView):
    """LocalAI's `POST /api/backends/upgrades/check`: check now, answer the map known now."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: check for upgrades now",
        description="Queues a check (or finds the one under way) and answers the upgrades known now. The "
        "check upgrades nothing, even with auto-upgrade on.",
        request=None,
        responses={200: UPGRADES_MAP},
    )
    def post(self, request: Request) -> Response:
        no_body_fields(request)
        UpgradeJob.request_check(requested_by=requested_by(request))
        return Response(upgrades_map())


class UpgradeView(LocalAIUIView):
    """LocalAI's `POST /api/backends/upgrade/<name>`: upgrade one backend."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: upgrade one backend",
        description="`statusUrl` is the path of `GET /api/backends/job/<uuid>`; `jobID` and `uuid` are the "
        "same. When an operation on that backend is already queued or running, it comes back.",
        parameters=[BACKEND_NAME],
        request=None,
        responses={
            200: inline_serializer(
                "LocalAIUpgradeStarted",
                fields={
                    "jobID": serializers.UUIDField(),
                    "message": serializers.CharField(),
                    "statusUrl": serializers.CharField(),
                    "uuid": serializers.UUIDField(),
                },
            ),
            **RESPONSES,
        },
    )
    def post(self, request: Request, name: str) -> Response:
        backend = backend_named(name)
        no_body_fields(request)
        job = request_operation(backend, JobKind.UPGRADE, request)
        status_url = reverse("localai-ui-job", kwargs={"uid": str(job.uuid)})
        return started(job, "Backend upgrade started", statusUrl=status_url, uuid=str(job.uuid))


# --- external sources -----------------------------------------------------------------------------------


def source_kind(uri: str) -> str:
    """What an external URI names, as LocalAI sorts them (pkg/downloader/uri.go): `oci` (an image),
    `download` (an archive by URL or file), `directory` (a local path), or `gallery` (anything else is
    a gallery backend's name). Unlike LocalAI, any `registry/repository:tag` is an image, not only
    the few registries it knows by name."""
    lowered = uri.lower()
    if lowered.startswith(("oci://", "docker://")):
        return "oci"
    if "://" in lowered or lowered.startswith("github:"):
        return "download"
    if uri.startswith(("/", "./", "../", "~")):
        return "directory"
    if "/" in uri:
        try:
            oci.parse_reference(uri)
        except oci.InvalidReference:
            return "directory"
        return "oci"
    return "gallery"


class ExternalSourceSerializer(JsonBodySerializer):
    """LocalAI's `ExternalBackendRequest`."""

    uri = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=1000,
        help_text="An image (`oci://registry/repo:tag`, `registry/repo:tag`), a directory, an archive "
        "(`https://.../x.tar.gz`, `file:///...`), or a gallery backend's name.",
    )
    name = serializers.CharField(required=False, allow_blank=True, max_length=255)
    alias = serializers.CharField(required=False, allow_blank=True, max_length=255)


class InstallExternalView(LocalAIUIView):
    """LocalAI's `POST /api/backends/install-external`: install from an image, a directory or an
    archive, or a gallery backend by name."""

    @extend_schema(
        tags=["localai-ui"],
        summary="LocalAI UI: install from an external source",
        description="`{uri, name, alias}`. An image needs `name`; a directory or an archive defaults it to "
        "the file name. The backend is kept in the `external` gallery and installed through the same "
        "procedure as any other (verified, staged, swapped, health-checked). A `uri` that is none of "
        "these is a gallery backend's name (then `name` and `alias` are refused).",
        request=ExternalSourceSerializer,
        responses={
            200: inline_serializer(
                "LocalAIExternalStarted",
                fields={"jobID": serializers.UUIDField(), "message": serializers.CharField()},
            ),
            **RESPONSES,
        },
    )
    def post(self, request: Request) -> Response:
        body = ExternalSourceSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        uri = body.validated_data.get("uri", "").strip()
        name = body.validated_data.get("name", "").strip()
        alias = body.validated_data.get("alias", "").strip()
        if not uri:
            raise BadRequest("uri is required")
        kind = source_kind(uri)
        if kind == "gallery":
            if name or alias:
                raise BadRequest("specifying a name or alias is not supported for gallery backends")
            job = request_operation(backend_named(uri), JobKind.INSTALL, request)
            return started(job, "External backend installation started")
        if kind == "oci":
            if not name:
                raise BadRequest("specifying a name is required for OCI images")
            try:
                oci.parse_reference(uri)
            except oci.InvalidReference as exc:
                raise BadRequest(str(exc)) from None
        try:
            backend = Backend.objects.external(uri, name=name, alias=alias)
        except OperationRefused as exc:
            raise (Refused if exc.reason == "taken" else BadRequest)(str(exc)) from None
        job = request_operation(backend, JobKind.INSTALL, request, force=True)
        return started(job, "External backend installation started")
