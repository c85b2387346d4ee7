"""LocalAI's backend routes at LocalAI's paths (core/http/routes/localai.go), with LocalAI's JSON.

This module holds what both LocalAI families share (the views' base, errors, how a job, an installed
backend and a gallery entry read in LocalAI's shapes) and the REST family, `/backends...`:

- `GET /backends`: installed backends as `SystemBackend` (`Name`, `RunFile`, `IsMeta`, `IsSystem`,
  `Metadata`);
- `GET /backends/available`, `/backends/known`, `/backends/galleries`: gallery entries runnable
  here, the import form's list, the galleries followed;
- `POST /backends/apply`, `POST /backends/delete/<name>`, `POST /backends/upgrade/<name>`: a job,
  answered `{"id": <uuid>, "status_url": ...}`;
- `GET /backends/jobs/<uuid>`: the job as LocalAI's `OpStatus`;
- `GET /backends/upgrades`, `POST /backends/upgrades/check`: the upgrades map.

The web UI's family (`/api/backends...`, `/api/operations...`) is in `localai_ui`. Both call the
same model verbs as the rest of the portal; only the shapes differ. docs/api.md maps each route.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Iterable
from typing import Any

from django.db.models import Count, Prefetch, Q, QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    inline_serializer,
)
from rest_framework import exceptions, serializers, status
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.negotiation import BaseContentNegotiation, DefaultContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView

from backends_app import permissions
from backends_app.api.authentication import ApiKeyHeaderAuthentication, BearerTokenAuthentication
from backends_app.api.errors import LOCALAI, AmbiguousName, PayloadTooLarge, error_body
from backends_app.api.known_backends import KNOWN_BACKENDS
from backends_app.api.serializers import JsonBodySerializer
from backends_app.api.views import backends_with_details, lookup_text, no_body_fields, requested_by
from backends_app.disk import layout
from backends_app.models import (
    Backend,
    Gallery,
    InstalledVersion,
    JobKind,
    JobPhase,
    JobStatus,
    Node,
    OperationRefused,
    UpgradeJob,
)

#: The gallery that holds the backends installed from an external URI
#: (`POST /api/backends/install-external`). It is never synced: it has no index.
EXTERNAL_GALLERY = "external"

# What a LocalAI client sees for an authentication failure (core/http/auth/middleware.go).
NOT_AUTHENTICATED = "An authentication key is required"


# --- errors and the views' base ---------------------------------------------------------------------


class Refused(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "refused"


def error_message(exc: Exception, data: Any) -> str:
    """One line from DRF's error data: the detail, or "field: message; ..." for invalid fields."""
    if isinstance(exc, exceptions.NotAuthenticated):
        return NOT_AUTHENTICATED
    detail = data.get("detail") if isinstance(data, dict) else None
    if detail is not None:
        return str(detail)
    if isinstance(data, dict):
        return "; ".join(f"{field}: {_text(errors)}" for field, errors in data.items())
    return _text(data)


def _text(errors: Any) -> str:
    return " ".join(str(error) for error in errors) if isinstance(errors, list) else str(errors)


def error_type(exc: Exception) -> str:
    """LocalAI's `type`: its auth middleware names the failure; a handler's error has an empty type."""
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        return "invalid_request_error"
    if isinstance(exc, exceptions.PermissionDenied):
        return "authorization_error"
    return ""


class AlwaysJSON(BaseContentNegotiation):
    """LocalAI answers JSON whatever the request's `Accept` says (a browser's `text/html` included)."""

    def select_parser(self, request: Request, parsers: Iterable[BaseParser]) -> BaseParser | None:
        return DefaultContentNegotiation().select_parser(request, parsers)

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


class LocalAIView(APIView):
    """A LocalAI route: JSON only, the portal's sign-in and permissions, LocalAI's error envelope
    `{"error": {"code", "message", "type"}}`.

    `Authorization: Bearer <portal token>` comes first, so a request without credentials gets
    `WWW-Authenticate: Bearer` as from LocalAI; the token also works in `x-api-key` or `xi-api-key`,
    as LocalAI's keys do. A session still works, with Django's CSRF check on
    writes (a POST without the token is a 403 in the envelope).
    """

    renderer_classes = [JSONRenderer]
    content_negotiation_class = AlwaysJSON
    authentication_classes = [
        BearerTokenAuthentication,
        ApiKeyHeaderAuthentication,
        TokenAuthentication,
        SessionAuthentication,
    ]
    write_action = permissions.OPERATE

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)
        message = error_message(exc, response.data)
        response.data = self.error_data(exc, response.status_code, message)
        return response

    def error_data(self, exc: Exception, code: int, message: str) -> dict[str, Any]:
        return error_body(LOCALAI, code, message, error_type(exc))


#: Errors LocalAI's web framework answers before a handler runs (sign-in, permission, CSRF, method,
#: body size): in the envelope on every route, the web UI's routes included.
FRAMEWORK_ERRORS = (
    exceptions.NotAuthenticated,
    exceptions.AuthenticationFailed,
    exceptions.PermissionDenied,
    exceptions.MethodNotAllowed,
    PayloadTooLarge,
)


def go_map(values: dict[str, Any]) -> dict[str, Any]:
    """A JSON object keyed as Go writes a `map[string]any`: keys in byte order."""
    return dict(sorted(values.items()))


# --- looking backends up by the names LocalAI clients use --------------------------------------------


def backend_named(name: str) -> Backend:
    """The backend a LocalAI client means by `name`: a gallery name or `gallery@name`, else an
    installed alias (LocalAI lists aliases among installed backends and acts on them).

    Raises NotFound, or AmbiguousName when several galleries hold the name.
    """
    name = lookup_text(name)
    try:
        return Backend.objects.lookup(name)
    except Backend.MultipleObjectsReturned as exc:
        raise AmbiguousName(str(exc)) from None
    except Backend.DoesNotExist as exc:
        aliased = (
            InstalledVersion.objects.filter(
                state=InstalledVersion.State.CURRENT, alias=name, backend__isnull=False
            )
            .select_related("backend__gallery")
            .order_by("name")
            .first()
        )
        if aliased is not None and aliased.backend is not None:
            return aliased.backend
        raise exceptions.NotFound(str(exc)) from None


def request_operation(backend: Backend, kind: str, request: Request, *, force: bool = False) -> UpgradeJob:
    """Ask for `kind` on `backend` the way every entry point does; a refusal is a 409.

    When an operation on that backend is already queued or running, that job comes back (LocalAI
    would queue a second one behind it; the portal follows the one in progress).
    """
    try:
        job, _ = backend.request(kind, requested_by=requested_by(request), force=force)
    except OperationRefused as exc:
        raise Refused(str(exc)) from None
    return job


def job_by_uuid(value: str) -> UpgradeJob | None:
    try:
        key = uuid_module.UUID(value)
    except ValueError:
        return None
    return (
        UpgradeJob.objects.select_related("backend__gallery", "node")
        .prefetch_related(Prefetch("children", queryset=UpgradeJob.objects.select_related("node")))
        .filter(uuid=key)
        .first()
    )


def is_distributed() -> bool:
    """Nodes served by their own workers exist: LocalAI's distributed mode, where listings say per node."""
    return Node.objects.exclude(queue="").exists()


# --- a job as LocalAI's OpStatus ---------------------------------------------------------------------


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


def failed(job: UpgradeJob) -> bool:
    """Finished without doing what was asked (failed, rolled back, interrupted, partly failed)."""
    return job.status in JobStatus.FINISHED and job.status not in (JobStatus.SUCCEEDED, JobStatus.CANCELLED)


def job_error(job: UpgradeJob) -> str:
    return job.error or job.message or job.get_status_display()


def job_progress(job: UpgradeJob) -> float:
    """Percent done; a fan-out still running is as far as its nodes are on average."""
    children = list(job.children.all()) if job.is_active else []
    if children:
        return round(sum(child.percent for child in children) / len(children), 1)
    return float(job.percent)


def job_message(job: UpgradeJob) -> str:
    """LocalAI's messages, which clients compare: "queued", "completed", "cancelled", "error: ..."."""
    name = job.backend.name if job.backend else ""
    if job.status == JobStatus.QUEUED:
        return "queued"
    if job.status == JobStatus.RUNNING:
        return job.message or f"processing backend: {name}"
    if job.status == JobStatus.SUCCEEDED:
        return "completed"
    if job.status == JobStatus.CANCELLED:
        return "cancelled"
    return f"error: {job_error(job)}"


def cancellable(job: UpgradeJob) -> bool:
    """Whether a cancel still stops it: queued, or running and not yet touching the backend (the
    procedure honours a cancel only before the swap; a removal is never stopped half-way)."""
    if job.status == JobStatus.QUEUED:
        return True
    return (
        job.status == JobStatus.RUNNING
        and not job.cancel_requested
        and job.kind != JobKind.UNINSTALL
        and job.phase in (JobPhase.QUEUED, JobPhase.RESOLVING, JobPhase.DOWNLOADING)
    )


def node_progress(job: UpgradeJob) -> list[dict[str, Any]]:
    """A fan-out's nodes as LocalAI's `NodeProgress`, sorted by node name (as its operations list)."""
    nodes = []
    for child in sorted(job.children.all(), key=lambda c: c.node.name if c.node else ""):
        if child.status == JobStatus.QUEUED:
            state = "queued"
        elif child.status == JobStatus.RUNNING:
            state = "downloading" if child.phase == JobPhase.DOWNLOADING else "running_on_worker"
        else:
            state = "success" if child.status == JobStatus.SUCCEEDED else "error"
        name = child.node.name if child.node else ""
        entry: dict[str, Any] = {"node_id": name, "node_name": name, "status": state}
        if child.source:
            entry["file_name"] = child.source
        if child.bytes_done > 0:
            entry["current"] = format_bytes(child.bytes_done)
        if child.bytes_total > 0:
            entry["total"] = format_bytes(child.bytes_total)
        entry["percentage"] = float(child.percent)
        if child.is_active:
            entry["phase"] = child.phase
        if failed(child):
            entry["error"] = job_error(child)
        nodes.append(entry)
    return nodes


def op_status(job: UpgradeJob) -> dict[str, Any]:
    """A job as LocalAI's `OpStatus` (core/services/galleryop/operation.go), keys in its order;
    `error`, `phase`, the byte counts and `nodes` only when LocalAI would send them."""
    body: dict[str, Any] = {"deletion": job.kind == JobKind.UNINSTALL, "file_name": job.source}
    if failed(job):
        body["error"] = job_error(job)
    body["processed"] = job.status in JobStatus.FINISHED
    body["message"] = job_message(job)
    body["progress"] = 100.0 if job.status == JobStatus.SUCCEEDED else job_progress(job)
    if job.is_active:
        body["phase"] = job.phase
    if job.bytes_done > 0:
        body["current_bytes"] = job.bytes_done
    if job.bytes_total > 0:
        body["total_bytes"] = job.bytes_total
    body["file_size"] = format_bytes(job.bytes_total) if job.bytes_total > 0 else ""
    body["downloaded_size"] = (
        format_bytes(job.bytes_done) if job.bytes_total > 0 or job.bytes_done > 0 else ""
    )
    body["gallery_element_name"] = job.backend.name if job.backend else ""
    body["cancelled"] = job.status == JobStatus.CANCELLED
    body["cancellable"] = cancellable(job)
    nodes = node_progress(job)
    if nodes:
        body["nodes"] = nodes
    return body


# --- installed backends as LocalAI's SystemBackend -----------------------------------------------------


def metadata_of(row: InstalledVersion) -> dict[str, str]:
    """An installed row as LocalAI's `BackendMetadata`: metadata.json's keys, in its order, empty ones
    left out (as LocalAI, a directory without metadata reads as `{"name": <dir>}`)."""
    values = {
        "alias": row.alias,
        "meta_backend_for": row.meta_backend_for,
        "name": row.name,
        "gallery_url": row.gallery_url,
        "installed_at": layout.format_rfc3339(row.installed_at) if row.installed_at else "",
        "version": row.version,
        "uri": row.uri,
        "digest": row.digest,
    }
    return {key: value for key, value in values.items() if value}


def current_rows() -> list[InstalledVersion]:
    """Every node's current versions, the portal's node first for each name."""
    rows = list(
        InstalledVersion.objects.filter(state=InstalledVersion.State.CURRENT)
        .select_related("node")
        .order_by("name", "-node__is_local", "node__name")
    )
    return rows


def installed_backends(rows: Iterable[InstalledVersion] | None = None) -> dict[str, dict[str, Any]]:
    """LocalAI's `ListSystemBackends`, from the portal's records: name -> `SystemBackend`.

    As LocalAI builds it (core/gallery/backends.go): each backend directory; each meta backend (its
    `RunFile` its concrete's); then each alias, as a row of the concrete it names, written over a
    meta backend of the same name. In distributed mode each row lists its nodes.
    """
    rows = current_rows() if rows is None else list(rows)
    distributed = is_distributed()
    by_name: dict[str, list[InstalledVersion]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)

    def system_backend(name: str, row: InstalledVersion, *, is_meta: bool, run_dir: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "Name": name,
            "RunFile": f"{row.node.backends_path.rstrip('/')}/{run_dir}/{layout.RUN_FILE}",
            "IsMeta": is_meta,
            "IsSystem": False,
            "Metadata": metadata_of(row),
        }
        if distributed:
            entry["nodes"] = [node_ref(r) for r in by_name.get(row.name, [row])]
        return entry

    listing: dict[str, dict[str, Any]] = {}
    concretes = {name: group[0] for name, group in by_name.items() if not group[0].is_meta}
    for name, row in concretes.items():
        listing[name] = system_backend(name, row, is_meta=False, run_dir=name)
    metas = {name: group[0] for name, group in by_name.items() if group[0].is_meta}
    for name, row in metas.items():
        listing[name] = system_backend(name, row, is_meta=True, run_dir=row.meta_backend_for)
    aliases: dict[str, InstalledVersion] = {}
    for row in concretes.values():
        if row.alias and row.alias not in aliases:
            aliases[row.alias] = row
    for alias, row in aliases.items():
        # The concrete its meta of the same name chose, when there is one; else the first.
        chosen = metas.get(alias)
        if chosen is not None and chosen.meta_backend_for in concretes:
            row = concretes[chosen.meta_backend_for]
        listing[alias] = system_backend(alias, row, is_meta=False, run_dir=row.name)
    return dict(sorted(listing.items()))


def node_ref(row: InstalledVersion) -> dict[str, str]:
    """LocalAI's `NodeBackendRef`: where a backend is installed, in distributed mode."""
    ref = {
        "node_id": row.node.name,
        "node_name": row.node.name,
        "node_status": "healthy" if row.node.online else "offline",
    }
    for key, value in (
        ("version", row.version),
        ("digest", row.digest),
        ("uri", row.uri),
        ("installed_at", layout.format_rfc3339(row.installed_at) if row.installed_at else ""),
    ):
        if value:
            ref[key] = value
    return ref


def installed_names(rows: Iterable[InstalledVersion] | None = None) -> set[str]:
    """The names LocalAI counts as installed: directories, meta backends and aliases."""
    rows = current_rows() if rows is None else rows
    names = set()
    for row in rows:
        names.add(row.name)
        if row.alias:
            names.add(row.alias)
    return names


# --- gallery entries as LocalAI's GalleryBackend -------------------------------------------------------


def gallery_config(gallery: Gallery) -> dict[str, Any]:
    """A gallery as LocalAI's `config.Gallery`: `{"url", "name"}` (the portal keeps no gallery mirrors)."""
    return {"url": gallery.url, "name": gallery.name}


def followed_galleries() -> QuerySet[Gallery]:
    return Gallery.objects.filter(enabled=True).exclude(name=EXTERNAL_GALLERY).order_by("name")


def gallery_entries() -> QuerySet[Backend]:
    """Every entry of every gallery followed, in index order (duplicates included, as LocalAI lists
    them); not the external installs nor entries gone from their index."""
    return (
        Backend.objects.filter(gone=False, gallery__enabled=True)
        .exclude(gallery__name=EXTERNAL_GALLERY)
        .select_related("gallery")
        .order_by("gallery__name", "position", "occurrence")
    )


def gallery_backend(backend: Backend, installed: bool) -> dict[str, Any]:
    """A gallery entry as LocalAI's `GalleryBackend`, keys in its order, empty ones left out."""
    raw = backend.entry if isinstance(backend.entry, dict) else {}
    values: list[tuple[str, Any]] = [
        ("url", raw.get("url")),
        ("name", backend.name),
        ("description", backend.description),
        ("license", backend.license),
        ("urls", raw.get("urls")),
        ("icon", backend.icon),
        ("tags", list(backend.tags)),
        ("files", raw.get("files")),
        ("size", raw.get("size")),
        ("gallery", gallery_config(backend.gallery)),
        ("installed", installed),
        ("backend", raw.get("backend")),
        ("alias", backend.alias),
        ("uri", backend.uri),
        ("version", backend.version),
        ("mirrors", list(backend.mirrors)),
        ("capabilities", go_map(backend.capabilities)),  # a Go map: keys in byte order
        ("sha256", backend.sha256),
    ]
    return {key: value for key, value in values if value or key == "gallery"}


def runs_on(backend: Backend, capability: str) -> bool:
    """LocalAI's `IsCompatibleWith` (core/gallery/backend_types.go, pkg/system/capabilities.go).

    A meta backend runs where the capability, `default` or `cpu` is one of its keys. A concrete one
    is judged by words in its name and image: darwin/mlx/metal need Apple hardware, l4t an NVIDIA
    Jetson, cuda/nvidia an NVIDIA GPU, rocm/hip/amd an AMD GPU, sycl/intel an Intel GPU; anything
    else is a CPU build and runs everywhere. The capability `disable` turns the filter off.
    """
    if capability == "disable":
        return True
    if backend.is_meta:
        return any(key in backend.capabilities for key in (capability, "default", "cpu"))
    words = f"{backend.name} {backend.uri}".lower()
    if any(token in words for token in ("darwin", "mlx", "metal")):
        return capability in ("metal", "darwin-x86")
    if "l4t" in words:
        return capability.startswith("nvidia-l4t")
    if "cuda" in words or "nvidia" in words:
        return capability.startswith("nvidia")
    if any(token in words for token in ("rocm", "hip", "amd")):
        return capability == "amd"
    if "sycl" in words or "intel" in words:
        return capability == "intel"
    return True


def cluster_capabilities() -> set[str]:
    """The capabilities backends may run with: this machine's, and each online worker node's (LocalAI's
    `AvailableBackendsForCapabilities` lists what any node of the cluster can run)."""
    capabilities = {Node.local().capability}
    capabilities |= {node.capability for node in Node.objects.exclude(queue="") if node.online}
    return capabilities


# --- the upgrades map --------------------------------------------------------------------------------


def upgrades_map() -> dict[str, dict[str, Any]]:
    """LocalAI's `GET /backends/upgrades` body: flagged backends keyed by name, keys in byte order.

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
    return go_map(upgrades)


# --- OpenAPI pieces ------------------------------------------------------------------------------------

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
                "type": serializers.CharField(allow_blank=True),
            },
        )
    },
)
BACKEND_RESPONSE = inline_serializer(
    "LocalAIBackendResponse",
    fields={
        "id": serializers.UUIDField(help_text="The job's id."),
        "status_url": serializers.URLField(help_text="`GET` it for the job's status."),
    },
)
NODE_PROGRESS_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["node_id", "node_name", "status", "percentage"],
        "properties": {
            "node_id": {"type": "string"},
            "node_name": {"type": "string"},
            "status": {
                "type": "string",
                "enum": ["queued", "downloading", "running_on_worker", "success", "error"],
            },
            "file_name": {"type": "string"},
            "current": {"type": "string"},
            "total": {"type": "string"},
            "percentage": {"type": "number"},
            "phase": {"type": "string"},
            "error": {"type": "string"},
        },
    },
}
OP_STATUS_SCHEMA = {
    "type": "object",
    "required": [
        "deletion",
        "file_name",
        "processed",
        "message",
        "progress",
        "file_size",
        "downloaded_size",
        "gallery_element_name",
        "cancelled",
        "cancellable",
    ],
    "properties": {
        "deletion": {"type": "boolean"},
        "file_name": {"type": "string", "description": "The image reference pulled."},
        "error": {"type": "string", "description": "Only when the job failed."},
        "processed": {"type": "boolean", "description": "The job has ended."},
        "message": {"type": "string"},
        "progress": {"type": "number"},
        "phase": {"type": "string", "description": "While queued or running."},
        "current_bytes": {"type": "integer"},
        "total_bytes": {"type": "integer"},
        "file_size": {"type": "string"},
        "downloaded_size": {"type": "string"},
        "gallery_element_name": {"type": "string"},
        "cancelled": {"type": "boolean"},
        "cancellable": {"type": "boolean"},
        "nodes": NODE_PROGRESS_SCHEMA,
    },
}
BACKEND_METADATA_SCHEMA = {
    "type": "object",
    "description": "metadata.json; keys with empty values are left out.",
    "properties": {
        key: {"type": "string"}
        for key in (
            "alias",
            "meta_backend_for",
            "name",
            "gallery_url",
            "installed_at",
            "version",
            "uri",
            "digest",
        )
    },
}
SYSTEM_BACKEND_SCHEMA = {
    "type": "object",
    "required": ["Name", "RunFile", "IsMeta", "IsSystem", "Metadata"],
    "properties": {
        "Name": {"type": "string"},
        "RunFile": {"type": "string"},
        "IsMeta": {"type": "boolean"},
        "IsSystem": {"type": "boolean"},
        "Metadata": {**BACKEND_METADATA_SCHEMA, "nullable": True},
        "nodes": {"type": "array", "items": {"type": "object"}, "description": "Distributed mode only."},
    },
}
GALLERY_CONFIG_SCHEMA = {
    "type": "object",
    "required": ["url", "name"],
    "properties": {"url": {"type": "string"}, "name": {"type": "string"}},
}
GALLERY_BACKEND_SCHEMA = {
    "type": "object",
    "required": ["gallery"],
    "properties": {
        "url": {"type": "string"},
        "name": {"type": "string"},
        "description": {"type": "string"},
        "license": {"type": "string"},
        "urls": {"type": "array", "items": {"type": "string"}},
        "icon": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "files": {"type": "array", "items": {}},
        "size": {"type": "string"},
        "gallery": GALLERY_CONFIG_SCHEMA,
        "installed": {"type": "boolean", "description": "Only when true."},
        "backend": {"type": "string"},
        "alias": {"type": "string"},
        "uri": {"type": "string"},
        "version": {"type": "string"},
        "mirrors": {"type": "array", "items": {"type": "string"}},
        "capabilities": {"type": "object", "additionalProperties": {"type": "string"}},
        "sha256": {"type": "string"},
    },
}
BACKEND_NAME = OpenApiParameter(
    "name",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="The backend's name, `gallery@name`, or an installed alias.",
    examples=[OpenApiExample("By name", value="cpu-llama-cpp")],
)
JOB_UUID = OpenApiParameter("uuid", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The job's id.")
REFUSALS = {
    400: LOCALAI_ERROR,
    404: LOCALAI_ERROR,
    409: LOCALAI_ERROR,
}


def backend_response(request: Request, job: UpgradeJob) -> Response:
    """LocalAI's `schema.BackendResponse`: the job's id and the absolute URL of its status."""
    return Response({"id": str(job.uuid), "status_url": status_url(request, job)})


def status_url(request: Request, job: UpgradeJob) -> str:
    return reverse("localai-job-status", kwargs={"uuid": str(job.uuid)}, request=request)


# --- the REST family ---------------------------------------------------------------------------------


class LocalAIBackendsView(LocalAIView):
    """LocalAI's `GET /backends`: the installed backends."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: installed backends",
        description="LocalAI's `[]SystemBackend`, sorted by name: each backend directory, meta backend and "
        "alias, with its metadata.json. `nodes` in distributed mode.",
        responses={200: OpenApiResponse({"type": "array", "items": SYSTEM_BACKEND_SCHEMA})},
    )
    def get(self, request: Request) -> Response:
        return Response(list(installed_backends().values()))


class LocalAIAvailableView(LocalAIView):
    """LocalAI's `GET /backends/available`: the gallery entries this machine (or a node) can run."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: gallery entries runnable here",
        description="LocalAI's `[]GalleryBackend` in gallery order, filtered by the capability of this "
        "machine and of every online worker node; `installed` when any node has it.",
        responses={200: OpenApiResponse({"type": "array", "items": GALLERY_BACKEND_SCHEMA})},
    )
    def get(self, request: Request) -> Response:
        capabilities = cluster_capabilities()
        installed = installed_names()
        return Response(
            [
                gallery_backend(backend, backend.name in installed)
                for backend in gallery_entries()
                if any(runs_on(backend, capability) for capability in capabilities)
            ]
        )


class LocalAIKnownView(LocalAIView):
    """LocalAI's `GET /backends/known`: what the model-import form offers."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: backends the import form knows",
        description="LocalAI's `[]KnownBackend`: its importers, drop-ins and preference-only backends, plus "
        "every installed name; sorted by modality, then name.",
        responses={
            200: OpenApiResponse(
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "modality", "auto_detect", "installed"],
                        "properties": {
                            "name": {"type": "string"},
                            "modality": {"type": "string"},
                            "auto_detect": {"type": "boolean"},
                            "description": {"type": "string"},
                            "installed": {"type": "boolean"},
                        },
                    },
                }
            )
        },
    )
    def get(self, request: Request) -> Response:
        known = {entry.name: entry for entry in KNOWN_BACKENDS}
        installed = installed_names()
        rows = []
        for name in sorted(set(known) | installed):
            entry = known.get(name)
            row: dict[str, Any] = {
                "name": name,
                "modality": entry.modality if entry else "",
                "auto_detect": entry.auto_detect if entry else False,
            }
            if entry and entry.description:
                row["description"] = entry.description
            row["installed"] = name in installed
            rows.append(row)
        rows.sort(key=lambda row: (row["modality"], row["name"]))
        return Response(rows)


class LocalAIGalleriesView(LocalAIView):
    """LocalAI's `GET /backends/galleries`: the backend galleries followed."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: backend galleries",
        responses={200: OpenApiResponse({"type": "array", "items": GALLERY_CONFIG_SCHEMA})},
    )
    def get(self, request: Request) -> Response:
        return Response([gallery_config(gallery) for gallery in followed_galleries()])


class ApplyBodySerializer(JsonBodySerializer):
    """LocalAI's `GalleryBackend` request body of `POST /backends/apply`."""

    id = serializers.CharField(max_length=400, help_text="The backend's name or `gallery@name`.")
    force = serializers.BooleanField(default=False, help_text="Reinstall even when already installed.")


def install_targets_have(backend: Backend) -> bool:
    """Whether an install of `backend` would only find it already there: on this node, or in
    distributed mode on every online worker node (where an install goes)."""
    nodes = {row.node_id for row in backend.installed.filter(state=InstalledVersion.State.CURRENT)}
    if not is_distributed():
        return Node.local().pk in nodes
    targets = {node.pk for node in Node.objects.exclude(queue="") if node.online}
    return bool(targets) and targets <= nodes


def already_installed_job(backend: Backend, request: Request) -> UpgradeJob:
    """`POST /backends/apply` without `force` for a backend already installed: LocalAI's install is
    idempotent, so nothing is downloaded. The request is still recorded, as a job that ends at once
    (or the operation already under way on that backend comes back)."""
    node = None if is_distributed() else Node.local()
    job, created = UpgradeJob.create_unless_active(
        JobKind.INSTALL, backend=backend, node=node, requested_by=requested_by(request)
    )
    if created and job.start():
        job.finish(f"{backend.name} is already installed: nothing to do (send force to reinstall)")
    return job


class LocalAIApplyView(LocalAIView):
    """LocalAI's `POST /backends/apply`: install a backend (idempotent unless `force`)."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: install a backend",
        description="Queues an install. Without `force`, a backend already installed is left alone: the "
        "job ends at once, nothing downloaded. With `force` it is reinstalled. When an operation on that "
        "backend is already queued or running, its id comes back.",
        request=ApplyBodySerializer,
        responses={200: BACKEND_RESPONSE, **REFUSALS},
    )
    def post(self, request: Request) -> Response:
        body = ApplyBodySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        backend = backend_named(body.validated_data["id"])
        force = body.validated_data["force"]
        if not force and install_targets_have(backend):
            return backend_response(request, already_installed_job(backend, request))
        return backend_response(request, request_operation(backend, JobKind.INSTALL, request, force=force))


class LocalAIDeleteView(LocalAIView):
    """LocalAI's `POST /backends/delete/<name>`: uninstall a backend."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: uninstall a backend",
        description="Queues an uninstall (of a meta backend, its concrete backend too).",
        parameters=[BACKEND_NAME],
        request=None,
        responses={200: BACKEND_RESPONSE, **REFUSALS},
    )
    def post(self, request: Request, name: str) -> Response:
        backend = backend_named(name)
        no_body_fields(request)
        return backend_response(request, request_operation(backend, JobKind.UNINSTALL, request))


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
        "with the upgrades known now; the check job's status URL is in the `Location` header. The check "
        "does not upgrade anything, even with auto-upgrade on.",
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
        parameters=[BACKEND_NAME],
        request=None,
        responses={200: BACKEND_RESPONSE, **REFUSALS},
    )
    def post(self, request: Request, name: str) -> Response:
        backend = backend_named(name)
        no_body_fields(request)
        return backend_response(request, request_operation(backend, JobKind.UPGRADE, request))


class LocalAIJobStatusView(LocalAIView):
    """LocalAI's `GET /backends/jobs/<uuid>`: a job as LocalAI's OpStatus."""

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: job status",
        parameters=[JOB_UUID],
        responses={200: OpenApiResponse(OP_STATUS_SCHEMA), 404: LOCALAI_ERROR},
    )
    def get(self, request: Request, uuid: str) -> Response:
        job = job_by_uuid(uuid)
        if job is None:
            raise exceptions.NotFound("could not find any status for ID")
        return Response(op_status(job))
