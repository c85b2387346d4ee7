"""Token authentication in the headers LocalAI clients send."""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import TokenAuthentication
from rest_framework.request import Request


class BearerTokenAuthentication(TokenAuthentication):
    """DRF's tokens, accepted as `Authorization: Bearer <token>`.

    LocalAI clients send their API key that way, so a portal token set as a client's LocalAI API key
    works unchanged on the LocalAI-compatible routes (and everywhere else).
    """

    keyword = "Bearer"


class ApiKeyHeaderAuthentication(TokenAuthentication):
    """DRF's tokens in `x-api-key` or `xi-api-key`, the other headers LocalAI reads an API key from
    (core/http/auth/middleware.go). A wrong key is refused (401), as in `Authorization`.

    LocalAI's legacy `token` cookie is not accepted: a cookie is sent by the browser on any site's
    request, so it would need the CSRF check that the session already has.
    """

    HEADERS = ("HTTP_X_API_KEY", "HTTP_XI_API_KEY")

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        for header in self.HEADERS:
            key = request.META.get(header, "").strip()
            if key:
                return self.authenticate_credentials(key)
        return None

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"
