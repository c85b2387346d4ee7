"""OpenAPI schema additions: the auth errors every protected operation can answer, the Bearer scheme."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from backends_app.api.errors import JSONErrorsMixin

AUTH_ERRORS = {
    "401": "Not signed in: send `Authorization: Bearer <key>` (or `Token <key>`), or use a session.",
    "403": "Signed in without the permission this needs (or, with a session, without the CSRF token).",
}


PAGE_ERRORS = {
    "400": "A malformed filter or page size; the body names the parameter.",
    "404": "No such page.",
}


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "backends_app.api.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A portal token, as LocalAI clients send it.",
        }


class ApiKeyHeaderScheme(OpenApiAuthenticationExtension):
    target_class = "backends_app.api.authentication.ApiKeyHeaderAuthentication"
    name = ["apiKeyAuth", "xiApiKeyAuth"]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list[Any]]]:
        return [{"apiKeyAuth": []}, {"xiApiKeyAuth": []}]  # either header, not both

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, str]]:
        return [
            {
                "type": "apiKey",
                "in": "header",
                "name": header,
                "description": "A portal token, in the header LocalAI also reads an API key from.",
            }
            for header in ("x-api-key", "xi-api-key")
        ]


def document_auth_errors(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """Add 401 and 403 to every operation that requires authentication (all but the schema itself).

    LocalAI's routes (both families) answer them in LocalAI's error envelope, the portal's own API
    (/api/v1/) with `{"detail": ...}`.
    """
    for route, path_item in result.get("paths", {}).items():
        body = "Error" if route.startswith("/api/v1/") else "LocalAIError"
        for operation in path_item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            if operation.get("security") == [{}]:  # open to anonymous users
                continue
            if any(parameter.get("name") == "page_size" for parameter in operation.get("parameters", [])):
                operation["responses"].setdefault("400", _error_response(PAGE_ERRORS["400"], None))
                operation["responses"].setdefault("404", _error_response(PAGE_ERRORS["404"], "Error"))
            for code, description in AUTH_ERRORS.items():
                operation["responses"].setdefault(code, _error_response(description, body))
    return result


def forbid_unknown_fields(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """Request bodies declare `additionalProperties: false`: the API refuses fields it does not take."""
    schemas = result.get("components", {}).get("schemas", {})
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for media in operation.get("requestBody", {}).get("content", {}).values():
                ref = media.get("schema", {}).get("$ref", "")
                component = schemas.get(ref.rpartition("/")[2])
                if component is not None and component.get("type") == "object":
                    component["additionalProperties"] = False
    return result


def _error_response(description: str, component: str | None) -> dict[str, Any]:
    """A JSON error response: the named component, or any object (DRF's field-keyed messages)."""
    schema = {"$ref": f"#/components/schemas/{component}"} if component else {"type": "object"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


class SchemaView(JSONErrorsMixin, SpectacularAPIView):
    """The OpenAPI schema (YAML or JSON); its errors are JSON like the rest of the API."""


class DocsView(JSONErrorsMixin, SpectacularSwaggerView):
    """Swagger UI; its errors are JSON like the rest of the API."""
