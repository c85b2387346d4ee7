"""The REST API under /api/: viewsets that read rows and call the model verbs, nothing more.

Status codes, the same everywhere:
- 202 a job was queued (the body is the job; `Location` is its URL);
- 409 nothing was queued because of the backend's state: `code` is `active_job` (the job already queued
  or running on that node comes back in `job`) or `refused` (the verb said no: pinned, not installed,
  nothing to roll back to, gone from its gallery, ...), or `finished` when cancelling a finished job;
- 400 malformed input, an unknown node in a body, or an ambiguous backend name;
- 404 no such backend, job or gallery.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from backends_app import permissions
from backends_app.api.errors import AmbiguousName
from backends_app.api.serializers import (
    NAME_MAX_LENGTH,
    ApplyRequestSerializer,
    ApplyResultSerializer,
    BackendFilterSerializer,
    BackendSerializer,
    ConflictSerializer,
    EmptyBodySerializer,
    ErrorSerializer,
    GallerySerializer,
    JobFilterSerializer,
    OperationRequestSerializer,
    PortalSettingsSerializer,
    SyncRequestSerializer,
    SyncResultSerializer,
    UpgradeJobSerializer,
    backend_ref,
)
from backends_app.models import (
    Backend,
    Gallery,
    JobKind,
    JobStatus,
    Node,
    OperationRefused,
    PortalSettings,
    SyncResult,
    UpgradeJob,
)


def requested_by(request: Request) -> str:
    return f"api:{request.user.get_username()}"


def lookup_text(value: str) -> str:
    """A name from the URL; characters no name can hold (NUL) make it a plain 404, not a database error."""
    if "\x00" in value:
        raise exceptions.NotFound("no such name")
    return value


def clean_filters(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any] | None:
    """The valid query parameters (a 400 otherwise); None when a value can match nothing (holds NUL)."""
    # A plain dict: with a QueryDict, DRF reads a missing boolean as False.
    params = serializer_class(data=request.query_params.dict())
    params.is_valid(raise_exception=True)
    values = {key: value for key, value in params.validated_data.items() if value != ""}
    if any(isinstance(value, str) and "\x00" in value for value in values.values()):
        return None
    return values


def no_body_fields(request: Request) -> None:
    """A verb that takes no fields refuses a body that has some (400 naming them), as the others
    refuse fields they do not take."""
    EmptyBodySerializer(data=request.data).is_valid(raise_exception=True)


def job_response(job: UpgradeJob, request: Request, code: int = status.HTTP_200_OK) -> Response:
    data = UpgradeJobSerializer(job, context={"request": request}).data
    headers = {"Location": data["url"]} if code == status.HTTP_202_ACCEPTED else None
    return Response(data, status=code, headers=headers)


def active_job_conflict(job: UpgradeJob, request: Request, detail: str) -> Response:
    data = UpgradeJobSerializer(job, context={"request": request}).data
    return Response({"detail": detail, "code": "active_job", "job": data}, status=status.HTTP_409_CONFLICT)


def refused(exc: OperationRefused) -> Response:
    return Response({"detail": str(exc), "code": "refused"}, status=status.HTTP_409_CONFLICT)


def backends_with_details() -> QuerySet[Backend]:
    """Visible backends with what the serializer shows prefetched: a fixed number of queries a page."""
    return Backend.objects.visible().with_installations()


def filter_backends(queryset: QuerySet[Backend], filters: dict[str, Any]) -> QuerySet[Backend]:
    for flag in ("upgrade_available", "pinned"):
        if flag in filters:
            queryset = queryset.filter(**{flag: filters[flag]})
    if "gallery" in filters:
        queryset = queryset.filter(gallery__name=filters["gallery"])
    if "search" in filters:
        queryset = queryset.filter(name__icontains=filters["search"])
    node: Node | None = None
    if "node" in filters:
        node = Node.objects.filter(name=filters["node"]).first()
        if node is None:
            return queryset.none()
    installed = filters.get("installed", True if node else None)
    if installed is not None:
        on_node = Backend.objects.installed_on(node).values("pk")
        queryset = queryset.filter(pk__in=on_node) if installed else queryset.exclude(pk__in=on_node)
    return queryset


ERRORS = {
    400: OpenApiResponse(OpenApiTypes.OBJECT, description="Malformed input; the body says which field."),
    404: OpenApiResponse(ErrorSerializer, description="No such backend."),
}
OPERATION_RESPONSES = {
    202: OpenApiResponse(UpgradeJobSerializer, description="Queued; the body is the new job."),
    409: OpenApiResponse(
        ConflictSerializer,
        description="Nothing queued: `active_job` (that job comes back in `job`) or `refused` (pinned, "
        "not installed, nothing to roll back to, gone from the gallery).",
    ),
    400: OpenApiResponse(
        OpenApiTypes.OBJECT, description="Malformed body, unknown node, or a name found in several galleries."
    ),
    404: ERRORS[404],
}
BACKEND_NAME = OpenApiParameter(
    "name",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="The backend's name, or `gallery@name` when several galleries hold that name.",
    examples=[
        OpenApiExample("By name", value="cpu-llama-cpp"),
        OpenApiExample("With its gallery", value="localai@cpu-llama-cpp"),
    ],
)
BACKEND_FILTERS = [
    OpenApiParameter("upgrade_available", OpenApiTypes.BOOL, description="Flagged by the last check."),
    OpenApiParameter("installed", OpenApiTypes.BOOL, description="Installed on any node (or on `node`)."),
    OpenApiParameter("pinned", OpenApiTypes.BOOL),
    OpenApiParameter(
        "node", {"type": "string", "maxLength": 200}, description="Installed on the node of this name."
    ),
    OpenApiParameter(
        "gallery", {"type": "string", "maxLength": 100}, description="In the gallery of this name."
    ),
    OpenApiParameter(
        "search",
        {"type": "string", "maxLength": NAME_MAX_LENGTH},
        description="Part of the backend's name.",
    ),
]


@extend_schema_view(
    list=extend_schema(
        summary="List backends",
        parameters=BACKEND_FILTERS,
        responses={200: BackendSerializer(many=True), 400: ERRORS[400]},
    ),
    retrieve=extend_schema(
        summary="One backend",
        parameters=[BACKEND_NAME],
        responses={200: BackendSerializer, 400: ERRORS[400], 404: ERRORS[404]},
    ),
)
@extend_schema(tags=["backends"])
class BackendViewSet(viewsets.ReadOnlyModelViewSet):
    """Gallery entries (first occurrence of each name), addressed by name or `gallery@name`."""

    serializer_class = BackendSerializer
    lookup_field = "name"
    lookup_value_regex = r"[^/]+"
    write_action = permissions.OPERATE

    def get_queryset(self) -> QuerySet[Backend]:
        queryset = backends_with_details()
        if self.action == "list":
            filters = clean_filters(BackendFilterSerializer, self.request)
            queryset = queryset.none() if filters is None else filter_backends(queryset, filters)
        return queryset

    def get_object(self) -> Backend:
        name = lookup_text(self.kwargs["name"])
        try:
            found = Backend.objects.lookup(name)
        except Backend.DoesNotExist as exc:
            raise exceptions.NotFound(str(exc)) from None
        except Backend.MultipleObjectsReturned as exc:
            raise AmbiguousName(str(exc)) from None
        return backends_with_details().get(pk=found.pk)

    def _operate(self, request: Request, kind: str) -> Response:
        backend = self.get_object()
        body = OperationRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        node = body.validated_data.get("node")
        try:
            job, created = backend.request(
                kind, node=node, requested_by=requested_by(request), force=body.validated_data["force"]
            )
        except OperationRefused as exc:
            return refused(exc)
        if not created:
            return active_job_conflict(
                job,
                request,
                f"{backend.name} already has job #{job.pk} ({job.kind}, {job.status}) on "
                f"{job.node.name if job.node else 'its node'}; nothing new was queued",
            )
        return job_response(job, request, status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="Converge: upgrade the nodes whose build differs from the newest",
        description="Fans an upgrade out to every node whose build differs, so all nodes agree.",
        parameters=[BACKEND_NAME],
        request=None,
        responses=OPERATION_RESPONSES,
    )
    @action(detail=True, methods=["post"])
    def converge(self, request: Request, name: str) -> Response:
        backend = self.get_object()
        no_body_fields(request)
        try:
            job, created = backend.converge(requested_by=requested_by(request))
        except OperationRefused as exc:
            return refused(exc)
        if not created:
            return active_job_conflict(job, request, f"{backend.name} already has job #{job.pk} running")
        return job_response(job, request, status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="Install the backend",
        parameters=[BACKEND_NAME],
        request=OperationRequestSerializer,
        responses=OPERATION_RESPONSES,
    )
    @action(detail=True, methods=["post"])
    def install(self, request: Request, name: str) -> Response:
        return self._operate(request, JobKind.INSTALL)

    @extend_schema(
        summary="Upgrade the backend",
        description='`{"force": true}` upgrades a pinned backend.',
        parameters=[BACKEND_NAME],
        request=OperationRequestSerializer,
        responses=OPERATION_RESPONSES,
    )
    @action(detail=True, methods=["post"])
    def upgrade(self, request: Request, name: str) -> Response:
        return self._operate(request, JobKind.UPGRADE)

    @extend_schema(
        summary="Roll back to the newest kept version",
        parameters=[BACKEND_NAME],
        request=OperationRequestSerializer,
        responses=OPERATION_RESPONSES,
    )
    @action(detail=True, methods=["post"])
    def rollback(self, request: Request, name: str) -> Response:
        return self._operate(request, JobKind.ROLLBACK)

    @extend_schema(
        summary="Uninstall the backend",
        parameters=[BACKEND_NAME],
        request=OperationRequestSerializer,
        responses=OPERATION_RESPONSES,
    )
    @action(detail=True, methods=["post"])
    def uninstall(self, request: Request, name: str) -> Response:
        return self._operate(request, JobKind.UNINSTALL)

    @extend_schema(
        summary="Pin: never upgrade automatically",
        parameters=[BACKEND_NAME],
        request=None,
        responses={200: BackendSerializer, 400: ERRORS[400], 404: ERRORS[404]},
    )
    @action(detail=True, methods=["post"])
    def pin(self, request: Request, name: str) -> Response:
        backend = self.get_object()
        no_body_fields(request)
        backend.pin()
        return Response(self.get_serializer(self.get_object()).data)

    @extend_schema(
        summary="Unpin",
        parameters=[BACKEND_NAME],
        request=None,
        responses={200: BackendSerializer, 400: ERRORS[400], 404: ERRORS[404]},
    )
    @action(detail=True, methods=["post"])
    def unpin(self, request: Request, name: str) -> Response:
        backend = self.get_object()
        no_body_fields(request)
        backend.unpin()
        return Response(self.get_serializer(self.get_object()).data)


@extend_schema_view(
    list=extend_schema(
        summary="Backends the last check flagged",
        description="Pinned ones included (see `pinned`); `apply` skips them.",
        responses={200: BackendSerializer(many=True), 400: ERRORS[400]},
    )
)
@extend_schema(tags=["upgrades"])
class UpgradeViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """What the last check found, a new check, and "upgrade everything flagged"."""

    serializer_class = BackendSerializer
    write_action = permissions.OPERATE

    def get_queryset(self) -> QuerySet[Backend]:
        return backends_with_details().filter(upgrade_available=True)

    @extend_schema(
        summary="Check for upgrades now",
        request=None,
        responses={
            202: OpenApiResponse(UpgradeJobSerializer, description="A check job was queued."),
            409: OpenApiResponse(
                ConflictSerializer, description="A check is already queued or running: `job` is that one."
            ),
        },
    )
    @action(detail=False, methods=["post"])
    def check(self, request: Request) -> Response:
        no_body_fields(request)
        job, created = UpgradeJob.request_check(requested_by=requested_by(request))
        if not created:
            return active_job_conflict(
                job, request, f"check #{job.pk} is already {job.status}; nothing new was queued"
            )
        return job_response(job, request, status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="Upgrade every flagged backend",
        description="Queues an upgrade of each backend flagged and not pinned. 202 when at least one job "
        "was queued, 200 when none was; `skipped` lists the others with the reason.",
        request=ApplyRequestSerializer,
        responses={
            202: ApplyResultSerializer,
            200: ApplyResultSerializer,
            400: ERRORS[400],
        },
    )
    @action(detail=False, methods=["post"])
    def apply(self, request: Request) -> Response:
        body = ApplyRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        node = body.validated_data.get("node")
        outcomes = (
            Backend.objects.upgradable(node)
            .select_related("gallery")
            .request_each(JobKind.UPGRADE, node=node, requested_by=requested_by(request))
        )
        skipped: list[dict[str, Any]] = [
            {"backend": backend_ref(backend), "reason": str(exc), "job": None}
            for backend, exc in outcomes.refused
        ]
        skipped += [
            {
                "backend": backend_ref(backend),
                "reason": f"job #{job.pk} ({job.kind}) is already {job.status}",
                "job": job.pk,
            }
            for backend, job in outcomes.already_active
        ]
        data = {
            "jobs": UpgradeJobSerializer(outcomes.jobs, many=True, context={"request": request}).data,
            "skipped": skipped,
        }
        return Response(data, status=status.HTTP_202_ACCEPTED if outcomes.jobs else status.HTTP_200_OK)


JOB_ID = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH, description="The job's id.")


@extend_schema_view(
    list=extend_schema(
        summary="Jobs, newest first",
        parameters=[
            OpenApiParameter(
                "status",
                OpenApiTypes.STR,
                enum=[*JobStatus.values, "active", "finished"],
                description="A status, or `active` (queued or running), or `finished` (any end state).",
            ),
            OpenApiParameter("kind", OpenApiTypes.STR, enum=JobKind.values),
            OpenApiParameter(
                "backend",
                {"type": "string", "maxLength": NAME_MAX_LENGTH + 101},
                description="Backend name or gallery@name.",
            ),
        ],
        responses={200: UpgradeJobSerializer(many=True), 400: ERRORS[400]},
    ),
    retrieve=extend_schema(
        summary="One job",
        parameters=[JOB_ID],
        responses={200: UpgradeJobSerializer, 404: OpenApiResponse(ErrorSerializer)},
    ),
)
@extend_schema(tags=["jobs"])
class UpgradeJobViewSet(viewsets.ReadOnlyModelViewSet):
    """Every operation and check, with live progress and how it ended."""

    serializer_class = UpgradeJobSerializer
    lookup_value_regex = r"[^/]+"
    write_action = permissions.OPERATE

    def get_queryset(self) -> QuerySet[UpgradeJob]:
        queryset = UpgradeJob.objects.select_related("backend__gallery", "node").prefetch_related(
            Prefetch("children", queryset=UpgradeJob.objects.only("id", "parent_id"))
        )
        if self.action != "list":
            return queryset
        filters = clean_filters(JobFilterSerializer, self.request)
        if filters is None:
            return queryset.none()
        wanted = filters.get("status")
        if wanted == "active":
            queryset = queryset.filter(status__in=JobStatus.ACTIVE)
        elif wanted == "finished":
            queryset = queryset.filter(status__in=JobStatus.FINISHED)
        elif wanted:
            queryset = queryset.filter(status=wanted)
        if "kind" in filters:
            queryset = queryset.filter(kind=filters["kind"])
        if "backend" in filters:
            gallery_name, _, name = filters["backend"].rpartition("@")
            queryset = queryset.filter(backend__name=name)
            if gallery_name:
                queryset = queryset.filter(backend__gallery__name=gallery_name)
        return queryset.order_by("-created_at", "-id")

    def get_object(self) -> UpgradeJob:
        raw = self.kwargs["pk"]
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise exceptions.NotFound(f"no job with id {raw!r}")
        try:
            return self.get_queryset().get(pk=int(raw))
        except UpgradeJob.DoesNotExist:
            raise exceptions.NotFound(f"no job with id {raw}") from None

    @extend_schema(
        summary="Cancel the job",
        description="A queued job is cancelled at once (200). A running one is asked to stop at its next "
        "safe point (202; watch its status). A finished job cannot be cancelled (409).",
        parameters=[JOB_ID],
        request=None,
        responses={
            200: OpenApiResponse(UpgradeJobSerializer, description="Cancelled."),
            202: OpenApiResponse(UpgradeJobSerializer, description="Asked to stop; still running."),
            404: OpenApiResponse(ErrorSerializer),
            409: OpenApiResponse(ConflictSerializer, description="Already finished."),
        },
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        job = self.get_object()
        no_body_fields(request)
        if job.status in JobStatus.FINISHED:
            data = self.get_serializer(job).data
            detail = f"job #{job.pk} already finished ({job.status}); nothing to cancel"
            return Response(
                {"detail": detail, "code": "finished", "job": data}, status=status.HTTP_409_CONFLICT
            )
        job.cancel(by=requested_by(request))
        job = self.get_object()
        if job.status in JobStatus.FINISHED:
            return job_response(job, request)
        return job_response(job, request, status.HTTP_202_ACCEPTED)


@extend_schema(tags=["settings"])
class PortalSettingsView(APIView):
    """The operator's runtime settings: auto-upgrade, check interval, maintenance window, versions kept."""

    write_action = permissions.CHANGE_SETTINGS

    @extend_schema(summary="The portal settings", responses={200: PortalSettingsSerializer})
    def get(self, request: Request) -> Response:
        return Response(PortalSettingsSerializer(PortalSettings.load()).data)

    @extend_schema(
        summary="Change some settings",
        description="Only the fields sent change. Invalid input or an unknown field is a 400 and nothing "
        "is saved. Changing `health_check_command` needs a superuser (403 otherwise).",
        request=PortalSettingsSerializer,
        responses={
            200: PortalSettingsSerializer,
            400: ERRORS[400],
            403: OpenApiResponse(ErrorSerializer, description="Not allowed: the body says what is needed."),
        },
    )
    def patch(self, request: Request) -> Response:
        row = PortalSettings.load()
        serializer = PortalSettingsSerializer(row, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        command = serializer.validated_data.get("health_check_command", row.health_check_command)
        if command != row.health_check_command and not permissions.can(
            request.user, permissions.SET_HEALTH_CHECK_COMMAND
        ):
            raise exceptions.PermissionDenied(
                "Only a superuser may change health_check_command: the workers run it on every node. "
                "Nothing was saved."
            )
        serializer.save()
        return Response(serializer.data)


GALLERY_NAME = OpenApiParameter(
    "name", OpenApiTypes.STR, OpenApiParameter.PATH, examples=[OpenApiExample("LocalAI's", value="localai")]
)


@extend_schema_view(
    list=extend_schema(summary="Galleries followed"),
    retrieve=extend_schema(
        summary="One gallery",
        parameters=[GALLERY_NAME],
        responses={200: GallerySerializer, 404: OpenApiResponse(ErrorSerializer)},
    ),
    create=extend_schema(
        summary="Follow a gallery",
        description="The URL is checked (https://, http://, file:///absolute/path or "
        "github:owner/repo/path@branch) but not fetched; sync it next.",
        responses={201: GallerySerializer, 400: ERRORS[400]},
    ),
    partial_update=extend_schema(
        summary="Change a gallery",
        description="Any of url, enabled, signature_mode and verification (LocalAI's block, replaced "
        "whole; null clears it). See docs/signatures.md.",
        parameters=[GALLERY_NAME],
        responses={200: GallerySerializer, 400: ERRORS[400], 404: OpenApiResponse(ErrorSerializer)},
    ),
)
@extend_schema(tags=["galleries"])
class GalleryViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """The gallery indexes the portal reads backends from."""

    serializer_class = GallerySerializer
    queryset = Gallery.objects.all()
    lookup_field = "name"
    lookup_value_regex = r"[^/]+"
    http_method_names = ["get", "post", "patch", "head", "options"]  # changes are partial: no PUT

    def get_write_action(self, request: Request) -> str:
        return permissions.ADD_GALLERY if self.action == "create" else permissions.CHANGE_GALLERY

    def get_object(self) -> Gallery:
        name = lookup_text(self.kwargs["name"])
        gallery = Gallery.objects.filter(name=name).first()
        if gallery is None:
            raise exceptions.NotFound(f"no gallery named {name!r}")
        return gallery

    @extend_schema(
        summary="Sync the gallery now",
        description="Fetches and stores the index inline. 200 with what changed; 502 when the gallery "
        "could not be fetched or parsed (nothing changed; the error is recorded on the gallery).",
        parameters=[GALLERY_NAME],
        request=SyncRequestSerializer,
        responses={
            200: SyncResultSerializer,
            400: ERRORS[400],
            404: OpenApiResponse(ErrorSerializer),
            502: OpenApiResponse(SyncResultSerializer, description="The sync failed; `error` says why."),
        },
    )
    @action(detail=True, methods=["post"])
    def sync(self, request: Request, name: str) -> Response:
        gallery = self.get_object()
        body = SyncRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            result = gallery.sync(force=body.validated_data["force"])
        except (
            ValueError
        ) as exc:  # a malformed URL stored by other means; urllib's complaint, not a GalleryError
            result = SyncResult(
                gallery=gallery.name, error=f"gallery URL {gallery.url!r} is malformed: {exc}"
            )
        data = {
            "gallery": result.gallery,
            "ok": result.ok,
            "summary": result.summary(),
            "error": result.error,
            "not_modified": result.not_modified,
            "total": result.total,
            "created": result.created,
            "updated": result.updated,
            "gone": result.gone,
            "duplicates": sorted(set(result.duplicates)),
        }
        return Response(data, status=status.HTTP_200_OK if result.ok else status.HTTP_502_BAD_GATEWAY)
