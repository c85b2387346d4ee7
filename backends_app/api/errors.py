"""API errors: the exceptions beyond DRF's own, and the handlers that keep every error answer JSON.

Two shapes, chosen by the path: the portal's own API (/api/v1/, the schema and its docs page) answers
`{"detail": "..."}`; LocalAI's routes (any other path under /api/, and any path under /backends that
is not one of the pages) answer LocalAI's `{"error": {"code", "message", "type"}}`, which is what
LocalAI's web framework writes for an unknown path, a wrong method or a server error on any of its
routes. DRF's views answer their own errors in those shapes; the Django-level handlers here
(`handler400`, `handler403`, `handler404`, `handler500` in the URLconf) cover what happens outside a
view: an unknown path, a body over `DATA_UPLOAD_MAX_MEMORY_SIZE`, an unhandled exception. The pages
keep Django's HTML errors.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.db import DataError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import Resolver404, resolve
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

API = "api"
LOCALAI = "localai"


class BadRequest(exceptions.APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "bad_request"


class AmbiguousName(BadRequest):
    """A backend name held by several galleries: the message lists the `gallery@name` forms to use."""

    default_code = "ambiguous"


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "payload_too_large"


def too_large_message() -> str:
    return f"request body too large: at most {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes are read"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus: what the client sent wrong is a 4xx, never a server error.

    A value the database cannot store (out of range, ...) is a 400; a body over Django's
    `DATA_UPLOAD_MAX_MEMORY_SIZE` a 413; a query string with too many parameters a 400.
    """
    if isinstance(exc, DataError):
        exc = BadRequest("a value is out of range or malformed for the database")
    elif isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge(too_large_message())
    elif isinstance(exc, TooManyFieldsSent | TooManyFilesSent):
        exc = BadRequest(str(exc))
    return drf_exception_handler(exc, context)


#: The portal's own API; every other path under /api/ is LocalAI's.
API_PREFIXES = ("/api/v1/", "/api/schema/", "/api/docs/")
#: The `type` values LocalAI's envelope carries (its auth middleware's); its handlers' errors have "".
LOCALAI_TYPES = frozenset({"invalid_request_error", "authorization_error"})


def error_shape(path: str) -> str | None:
    """`api`, `localai`, or None for the pages (HTML errors)."""
    if path.startswith(API_PREFIXES):
        return API
    if path.startswith("/api/"):
        return LOCALAI
    if path == "/backends" or path.startswith("/backends/"):
        try:
            match = resolve(path)
        except Resolver404:
            return LOCALAI
        return None if match.namespace == "ui" else LOCALAI
    return None


def error_body(shape: str, code: int, message: str, error_type: str) -> dict[str, Any]:
    if shape == LOCALAI:
        kind = error_type if error_type in LOCALAI_TYPES else ""
        return {"error": {"code": code, "message": message, "type": kind}}
    return {"detail": message}


def json_error(shape: str, code: int, message: str, error_type: str) -> JsonResponse:
    return JsonResponse(error_body(shape, code, message, error_type), status=code)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's 400 (a `SuspiciousOperation` raised outside DRF's handling), JSON for the API."""
    shape = error_shape(request.path_info)
    if shape is None:
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return json_error(shape, 413, too_large_message(), "payload_too_large")
    return json_error(shape, 400, "bad request", "bad_request")


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    shape = error_shape(request.path_info)
    if shape is None:
        return defaults.permission_denied(request, exception)
    return json_error(shape, 403, "You do not have permission to do this.", "authorization_error")


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    shape = error_shape(request.path_info)
    if shape is None:
        return defaults.page_not_found(request, exception)
    message = "no such endpoint" + ("; the API's routes are listed at /api/v1/" if shape == API else "")
    return json_error(shape, 404, message, "not_found")


def server_error(request: HttpRequest) -> HttpResponse:
    """A 500 says nothing of its cause (it is in the server's log), in the route's shape."""
    shape = error_shape(request.path_info)
    if shape is None:
        return defaults.server_error(request)
    return json_error(shape, 500, "server error: the error is in the portal's log", "server_error")


class JSONErrorsMixin:
    """For DRF views that render something else (the schema's YAML, the docs page's HTML): their
    errors (a wrong method, ...) are JSON like the rest of the API."""

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(response, Response) and getattr(response, "exception", False):
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
