"""The OCI engine's one exception family.

Every failure the engine reports is an :class:`OCIError`; the subclasses let callers tell apart the
cases they react to differently (retry later, alert an operator, refuse an image for good). Messages
name the registry host, the repository and the digest or tar entry involved, and never a credential.
"""

from __future__ import annotations


class OCIError(Exception):
    """Base class for everything the OCI engine raises."""


class InvalidReference(OCIError, ValueError):
    """A string is not a valid image reference."""


class RegistryUnavailable(OCIError):
    """The registry could not be reached, kept failing (5xx) or rate-limited us beyond the max wait."""


class AuthError(OCIError):
    """The registry refused our credentials, or demands credentials we do not have."""


class NotFound(OCIError):
    """The repository, tag, manifest or blob does not exist (HTTP 404)."""


class PlatformNotFound(OCIError):
    """A multi-platform index has no manifest for the requested platform."""


class DigestMismatch(OCIError):
    """Content did not hash to the digest it was fetched by (or its size differed)."""


class UnsafeArchive(OCIError):
    """A layer holds an entry that would escape the target or is otherwise refused."""


class AllSourcesFailed(OCIError):
    """Every reference given to a ``*_first`` call failed; ``errors`` holds ``(source, error)`` pairs."""

    def __init__(self, message: str, errors: list[tuple[str, OCIError]]) -> None:
        super().__init__(message)
        self.errors = errors
