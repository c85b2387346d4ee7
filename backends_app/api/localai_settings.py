"""LocalAI's `GET/POST /api/settings`: the flat settings object LocalAI's web UI reads and posts back.

LocalAI (core/http/endpoints/localai/settings.go) answers GET with every key of its RuntimeSettings.
POST takes any part of that object (its settings page posts back the whole object it was given, plus
keys of its own such as `galleries_json`, which are ignored), merges it onto runtime_settings.json,
applies it and answers `{"success": true, "message": "Settings updated successfully"}`; a refusal is
`{"success": false, "error": "..."}`, 400 for what the client sent, 500 when the file cannot be read
or written.

The portal applies the keys it manages (`PortalSettings.SHARED_WITH_LOCALAI`: auto_upgrade_backends)
to its own settings and keeps every other key in the file for LocalAI, exactly as posted. Where it
differs from LocalAI, deliberately:
- credentials (`api_keys`, `p2p_token`, `agent_pool_database_url`) are never shown: GET has null, and
  the null posted back leaves them as they are (a value posted is written);
- a key the environment locks (LOCALAI_AUTO_UPGRADE_BACKENDS=true) refuses another value (400), where
  LocalAI would take it until its next restart; posted back at the environment's value it is ignored;
- `p2p_token: "0"` (LocalAI generates a token) is refused: only LocalAI can make one.
Unlike the portal's own API (`/api/settings/`), unknown keys are ignored here, as LocalAI ignores them.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig, ValidationError
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from backends_app import permissions, runtime_settings
from backends_app.api.errors import LOCALAI, error_body, too_large_message
from backends_app.models import PortalSettings

log = logging.getLogger(__name__)

SAVED = {"success": True, "message": "Settings updated successfully"}

_SCHEMA_TYPES: dict[str, dict[str, Any]] = {
    "bool": {"type": "boolean"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "string": {"type": "string"},
    "duration": {"type": "string", "description": "A Go duration: 15m, 1h30m, 500ms."},
    # Go reads a null item as its zero value ("", an empty gallery).
    "strings": {"type": "array", "items": {"type": "string", "nullable": True}},
    "galleries": {
        "type": "array",
        "items": {
            "type": "object",
            "nullable": True,
            "properties": {
                "url": {"type": "string", "nullable": True},
                "mirrors": {"type": "array", "nullable": True, "items": {"type": "string", "nullable": True}},
                "name": {"type": "string", "nullable": True},
                "verification": {
                    "type": "object",
                    "nullable": True,
                    "properties": {
                        key: {"type": "string", "nullable": True}
                        for key in ("issuer", "issuer_regex", "identity", "identity_regex", "not_before")
                    },
                },
            },
        },
    },
}
RUNTIME_SETTINGS_SCHEMA = {
    "type": "object",
    "description": "LocalAI's RuntimeSettings: every key on GET; any of them on POST (null: not set).",
    "properties": {
        name: {**_SCHEMA_TYPES[key.kind], "nullable": True} for name, key in runtime_settings.KEYS.items()
    },
    "additionalProperties": True,
}
SETTINGS_RESPONSE = {
    "type": "object",
    "required": ["success"],
    "properties": {
        "success": {"type": "boolean"},
        "message": {"type": "string"},
        "error": {"type": "string"},
    },
}


def refusal(code: int, error: str) -> Response:
    return Response({"success": False, "error": error}, status=code)


class LocalAISettingsView(APIView):
    """LocalAI's settings route. Reading needs a signed-in user; a change needs the settings
    permission (`backends_app.permissions.CHANGE_SETTINGS`). Tokens come as `Bearer <key>` or in
    `x-api-key`."""

    write_action = permissions.CHANGE_SETTINGS
    renderer_classes = [JSONRenderer]

    def handle_exception(self, exc: Exception) -> Response:
        """Authentication and permission refusals in LocalAI's error envelope, as its middleware answers."""
        response = super().handle_exception(exc)
        detail = response.data.get("detail") if isinstance(response.data, dict) else None
        error_type = getattr(detail, "code", None) or getattr(exc, "default_code", None) or "error"
        response.data = error_body(LOCALAI, response.status_code, str(detail or exc), str(error_type))
        return response

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: runtime settings",
        description="Every key of LocalAI's runtime_settings.json: what the portal runs with for the keys "
        "it manages (auto_upgrade_backends, the environment's value while it locks it), the file's value "
        "for the others, LocalAI's default where the file has none. Credentials are always null.",
        responses={200: OpenApiResponse(RUNTIME_SETTINGS_SCHEMA)},
    )
    def get(self, request: Request) -> Response:
        row = PortalSettings.load()
        stored: dict[str, Any] = {}
        path = PortalSettings.runtime_settings_path()
        if path is not None:
            try:
                stored = runtime_settings.read(path)
            except runtime_settings.RuntimeSettingsError as exc:
                log.warning("GET /api/settings shows defaults: %s", exc)
        live = {key: row.effective(name) for name, key in PortalSettings.SHARED_WITH_LOCALAI.items()}
        return Response(runtime_settings.snapshot(stored, live))

    @extend_schema(
        tags=["localai"],
        summary="LocalAI: change runtime settings",
        description="Any part of the object GET answers; unknown keys are ignored, null leaves a key as "
        "it is. The keys the portal manages take effect at once; every key is merged into "
        "runtime_settings.json for LocalAI. 400 for a malformed body, a value of the wrong type, a "
        "duration LocalAI cannot parse, or a change to a key the environment locks; 500 when the file "
        "cannot be read or written (then nothing changed).",
        request={"application/json": {**RUNTIME_SETTINGS_SCHEMA, "nullable": True}},  # null: nothing set
        responses={
            200: OpenApiResponse(SETTINGS_RESPONSE, description="Saved."),
            400: OpenApiResponse(SETTINGS_RESPONSE, description="Refused: `error` says why."),
            413: OpenApiResponse(SETTINGS_RESPONSE, description="The body is too large."),
            500: OpenApiResponse(SETTINGS_RESPONSE, description="The file could not be read or written."),
        },
    )
    def post(self, request: Request) -> Response:
        try:
            body = request.body
        except RequestDataTooBig:
            too_large = f"Failed to read request body: {too_large_message()}"
            return refusal(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, too_large)
        try:
            values = runtime_settings.parse_post(body)
        except runtime_settings.BodyError as exc:
            return refusal(status.HTTP_400_BAD_REQUEST, str(exc))
        if values.get("p2p_token") == "0":
            return refusal(
                status.HTTP_400_BAD_REQUEST,
                'p2p_token "0" asks for a new token, which only LocalAI can make: generate it in LocalAI, '
                "or post the token itself",
            )
        row = PortalSettings.load()
        shared = {
            name: values[key] for name, key in PortalSettings.SHARED_WITH_LOCALAI.items() if key in values
        }
        try:
            changes = row.without_locked(shared)
        except ValidationError as exc:
            problems = [f"{name}: {text}" for name, texts in exc.message_dict.items() for text in texts]
            return refusal(status.HTTP_400_BAD_REQUEST, "; ".join(problems))
        for name in shared.keys() - changes.keys():  # sent back at the environment's value: not stored
            values.pop(PortalSettings.SHARED_WITH_LOCALAI[name])
        for name in runtime_settings.BRANDING_FILES:  # LocalAI's asset upload owns them
            values.pop(name, None)
        path = PortalSettings.runtime_settings_path()
        if path is None:
            return refusal(
                status.HTTP_400_BAD_REQUEST,
                "DynamicConfigsDir is not set: PORTAL_CONFIG_DIR=off keeps runtime_settings.json off",
            )
        try:
            runtime_settings.update(path, values, always=True)
        except runtime_settings.Unreadable as exc:
            return refusal(status.HTTP_500_INTERNAL_SERVER_ERROR, f"Failed to read existing settings: {exc}")
        except runtime_settings.RuntimeSettingsError as exc:
            return refusal(status.HTTP_500_INTERNAL_SERVER_ERROR, f"Failed to write settings file: {exc}")
        if changes:
            for name, value in changes.items():
                setattr(row, name, value)
            row.save(update_fields=[*changes, "updated_at"], share=False)  # the file has them already
        return Response(SAVED)
