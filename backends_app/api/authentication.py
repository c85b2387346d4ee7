"""Token authentication in the header LocalAI clients send."""

from __future__ import annotations

from rest_framework.authentication import TokenAuthentication


class BearerTokenAuthentication(TokenAuthentication):
    """DRF's tokens, accepted as `Authorization: Bearer <token>`.

    LocalAI clients send their API key that way, so a portal token set as a client's LocalAI API key
    works unchanged on the LocalAI-compatible routes (and everywhere else).
    """

    keyword = "Bearer"
