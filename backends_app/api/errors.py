"""API errors beyond DRF's own, and the handler that keeps every bad input a 4xx."""

from __future__ import annotations

from typing import Any

from django.db import DataError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class BadRequest(exceptions.APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "bad_request"


class AmbiguousName(BadRequest):
    """A backend name held by several galleries: the message lists the `gallery@name` forms to use."""

    default_code = "ambiguous"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus: a value the database cannot store (out of range, ...) is the client's 400."""
    if isinstance(exc, DataError):
        exc = BadRequest("a value is out of range or malformed for the database")
    return drf_exception_handler(exc, context)
