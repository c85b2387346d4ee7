"""Routes with LocalAI's own paths and JSON shapes, so LocalAI clients keep working against the portal.

LocalAI (core/http/endpoints/localai/backend.go) serves:
- `GET /backends/upgrades`: `{name: UpgradeInfo}` for the backends with an upgrade;
- `POST /backends/upgrades/check`: starts a check and answers the current map (the check runs async);
- `POST /backends/upgrade/<name>`: `{"id", "status_url"}` of the queued operation;
- `GET /backends/jobs/<id>`: the operation's `GalleryOpStatus`.
The same model verbs as the rest of the API do the work; only the shapes differ. Errors come in the
OpenAI-style envelope LocalAI uses: `{"error": {"code": 404, "message": "...", "type": "..."}}`.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Q
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView

from backends_app import permissions
from backends_app.api.errors import LOCALAI, AmbiguousName, error_body
from backends_app.api.views import backends_with_details, lookup_text, no_body_fields, requested_by
from backends_app.models import (
    Backend,
    JobKind,
    JobStatus,
    Node,
    OperationRefused,
    UpgradeJob,
)


def format_bytes(size: int) -> str:
    """LocalAI's formatBytes (pkg/downloader): "512 B", "1.5 KiB", "12.3 MiB", binary units."""
    if size < 1024:
        return f"{size} B"
    div, exp = 1024, 0
    n = size // 1024
    while n >= 1024:
        div *= 1024
        exp += 1
        n //= 1024
    return f"{size / div:.1f} {'KMGTPE'[exp]}iB"


class Refused(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "refused"


class LocalAIView(APIView):
    """A LocalAI route: the portal's authentication and permissions, LocalAI's error envelope."""

    write_action = permissions.OPERATE

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)
        detail = response.data.get("detail") if isinstance(response.data, dict) else None
        if detail is not None:
            message = str(detail)
        elif isinstance(response.data, dict):  # field errors: "field: message; ..."
            message = "; ".join(f"{field}: {_text(errors)}" for field, errors in response.data.items())
        else:
            message = _text(response.data)
        error_type = getattr(detail, "code", None) or getattr(exc, "default_code", None) or type(exc).__name__
        response.data = error_body(LOCALAI, response.status_code, message, str(error_type))
        return response


def _text(errors: Any) -> str:
    return " ".join(str(error) for error in errors) if isinstance(errors, list) else str(errors)


UPGRADE_INFO_SCHEMA = {
    "type": "object",
    "required": ["backend_name", "installed_version", "available_version"],
    "properties": {
        "backend_name": {"type": "string"},
        "installed_version": {"type": "string"},
        "available_version": {"type": "string"},
        "installed_digest": {"type": "string", "description": "Omitted when empty, as in LocalAI."},
        "available_digest": {"type": "string", "description": "Omitted when empty, as in LocalAI."},
        "node_drift": {
            "type": "array",
            "description": "The nodes whose build differs from the majority's; omitted when all agree.",
            "items": {
                "type": "object",
                "required": ["node_id", "node_name"],
                "properties": {
                    "node_id": {"type": "string"},
                    "node_name": {"type": "string"},
                    "version": {"type": "string"},
                    "digest": {"type": "string"},
                },
            },
        },
    },
}
UPGRADES_MAP = OpenApiResponse(
    {"type": "object", "additionalProperties": UPGRADE_INFO_SCHEMA},
    description="LocalAI's `map[string]gallery.UpgradeInfo`: flagged backends by name (`gallery@name` "
    "for a name several galleries share).",
)
LOCALAI_ERROR = inline_serializer(
    "LocalAIError",
    fields={
        "error": inline_serializer(
            "LocalAIErrorBody",
            fields={
                "code": serializers.IntegerField(),
                "message": serializers.CharField(),
                "type": serializers.CharField(),
            },
        )
    },
)


def upgrades_map() -> dict[str, dict[str, Any]]:
    """LocalAI's `GET /backends/upgrades` body: flagged backends keyed by name.

    A name two galleries share is keyed `gallery@name` for each, so every key can be passed back to
    `POST /backends/upgrade/<key>`. Where nodes run different builds, LocalAI's `node_drift` lists
    them and the installed version and digest are the majority's (`Backend.node_drift`); such a
    backend is listed even when no node is behind the gallery (unless pinned).
    """
    local = Node.local()
    drifting = Q(pk__in=Backend.objects.drifting(), pinned=False)
    flagged = list(backends_with_details().filter(Q(upgrade_available=True) | drifting))
    shared = set(
        Backend.objects.visible()
        .filter(name__in={b.name for b in flagged})
        .values("name")
        .annotate(galleries=Count("id"))
        .filter(galleries__gt=1)
        .values_list("name", flat=True)
    )
    upgrades: dict[str, dict[str, Any]] = {}
    for backend in flagged:
        drift = backend.node_drift()
        if not drift and not backend.upgrade_available:
            continue
        key = f"{backend.gallery.name}@{backend.name}" if backend.name in shared else backend.name
        current = backend.current_versions()
        installed = next((r for r in current if r.node_id == local.pk), current[0] if current else None)
        version, digest = (installed.version, installed.digest) if installed else ("", "")
        if drift:
            version, digest = backend.majority_build()
        info: dict[str, Any] = {
            "backend_name": backend.name,
            "installed_version": version,
            "available_version": backend.available_version,
        }
        # LocalAI omits empty digests and an empty drift (`omitempty`).
        if digest:
            info["installed_digest"] = digest
        if backend.latest_digest:
            info["available_digest"] = backend.latest_digest
        if drift:
            info["node_drift"] = drift
        upgrades[key] = info
    return upgrades


def status_url(request: Request, job: UpgradeJob) -> str:
    return reverse("localai-job-status", kwargs={"job_id": job.pk}, request=request)


class LocalAIUpgradesView(LocalAIView):
    """LocalAI's `GET /backends/upgrades`: the backends with an upgrade available."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: backends with an upgrade",
        responses={200: UPGRADES_MAP},
    )
    def get(self, request: Request) -> Response:
        return Response(upgrades_map())


class LocalAICheckUpgradesView(LocalAIView):
    """LocalAI's `POST /backends/upgrades/check`: check for upgrades now."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: check for upgrades now",
        description="Queues a check (or finds the one already queued or running) and answers, like LocalAI, "
        "with the upgrades known now; the check job's status URL is in the `Location` header.",
        request=None,
        responses={200: UPGRADES_MAP},
    )
    def post(self, request: Request) -> Response:
        no_body_fields(request)
        job, _ = UpgradeJob.request_check(requested_by=requested_by(request))
        return Response(upgrades_map(), headers={"Location": status_url(request, job)})


class LocalAIUpgradeBackendView(LocalAIView):
    """LocalAI's `POST /backends/upgrade/<name>`: upgrade one backend."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: upgrade one backend",
        description="200 with the job's id and status URL, also when an operation on that backend was "
        "already queued or running (its id comes back). 409 when the backend refuses (pinned, not "
        "installed), 404 unknown, 400 ambiguous name.",
        parameters=[OpenApiParameter("name", OpenApiTypes.STR, OpenApiParameter.PATH)],
        request=None,
        responses={
            200: inline_serializer(
                "LocalAIBackendResponse",
                fields={"id": serializers.CharField(), "status_url": serializers.URLField()},
            ),
            400: LOCALAI_ERROR,
            404: LOCALAI_ERROR,
            409: LOCALAI_ERROR,
        },
    )
    def post(self, request: Request, name: str) -> Response:
        try:
            backend = Backend.objects.lookup(lookup_text(name))
        except Backend.DoesNotExist as exc:
            raise exceptions.NotFound(str(exc)) from None
        except Backend.MultipleObjectsReturned as exc:
            raise AmbiguousName(str(exc)) from None
        no_body_fields(request)
        try:
            job, _ = backend.request(JobKind.UPGRADE, requested_by=requested_by(request))
        except OperationRefused as exc:
            raise Refused(str(exc)) from None
        return Response({"id": str(job.pk), "status_url": status_url(request, job)})


class LocalAIJobStatusView(LocalAIView):
    """LocalAI's `GET /backends/jobs/<id>`: a job as LocalAI's GalleryOpStatus."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: job status",
        parameters=[OpenApiParameter("job_id", OpenApiTypes.INT, OpenApiParameter.PATH)],
        responses={
            200: inline_serializer(
                "LocalAIGalleryOpStatus",
                fields={
                    "deletion": serializers.BooleanField(),
                    "file_name": serializers.CharField(),
                    "error": serializers.CharField(allow_null=True),
                    "processed": serializers.BooleanField(),
                    "message": serializers.CharField(),
                    "progress": serializers.FloatField(),
                    "file_size": serializers.CharField(),
                    "downloaded_size": serializers.CharField(),
                    "gallery_element_name": serializers.CharField(),
                    "cancelled": serializers.BooleanField(),
                    "cancellable": serializers.BooleanField(),
                },
            ),
            404: LOCALAI_ERROR,
        },
    )
    def get(self, request: Request, job_id: str) -> Response:
        job = None
        if job_id.isascii() and job_id.isdigit() and len(job_id) <= 18:
            job = UpgradeJob.objects.select_related("backend").filter(pk=int(job_id)).first()
        if job is None:
            raise exceptions.NotFound(f"could not find any status for ID {job_id}")
        return Response(gallery_op_status(job))


def gallery_op_status(job: UpgradeJob) -> dict[str, Any]:
    """A job as LocalAI's GalleryOpStatus; types as LocalAI's JSON has them (sizes are strings)."""
    failed = bool(job.error) and job.status in JobStatus.FINISHED
    message = f"error: {job.error}" if failed else job.message
    return {
        "deletion": job.kind == JobKind.UNINSTALL,
        "file_name": job.source,
        "error": job.error or None,
        "processed": job.status in JobStatus.FINISHED,
        "message": message,
        "progress": float(job.percent),
        "file_size": format_bytes(job.bytes_total) if job.bytes_total > 0 else "",
        "downloaded_size": format_bytes(job.bytes_done) if job.bytes_total > 0 or job.bytes_done > 0 else "",
        "gallery_element_name": job.backend.name if job.backend else "",
        "cancelled": job.status == JobStatus.CANCELLED,
        "cancellable": job.status in JobStatus.ACTIVE,
    }
